"""Reading apt's package lists (Packages, Translation-*) as the corpus keeps them: decompressed by
apt itself, split into stanzas, the long description cut from its synopsis."""
import subprocess


def cat(path):
    # apt-helper decompresses whatever apt stored (.lz4, .xz, .gz or plain)
    return subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], check=True,
                          capture_output=True).stdout.decode("utf-8", "replace")


def stanzas(text):
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.split("\n"):
            if line.startswith(" ") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def long_description(raw):
    """The long description of a Description field: paragraphs kept, ' .' lines made blank."""
    out = []
    for line in raw.split("\n")[1:]:  # the first line is the synopsis
        line = line[1:] if line.startswith(" ") else line
        out.append("" if line.strip() == "." else line)
    return "\n".join(out).strip()
