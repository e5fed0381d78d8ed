"""Debian's translated package descriptions (Translation-de, -fr, -ja, …): text in many languages
that none of us wrote, with the English original of every one (matched by Description-md5).

scripts/setup.sh copies the lists to $PES_CORPUS_DIR/i18n (fetched with
`apt-get update -o Acquire::Languages=…` into a private lists folder). A translation counts only
when its md5 is that of the current English description, so the pair really says the same thing.
"""
import glob
import hashlib
import os
import re

from .debian_lists import cat, long_description, stanzas

CORPUS = os.environ.get("PES_CORPUS_DIR", "/opt/pg_embed_sidecar/corpus")
I18N = os.path.join(CORPUS, "i18n")


def descriptions(lang):
    """{package: (md5, synopsis, long description)} of one language ("en" included), sorted."""
    code = lang.replace("_", "%5f")
    paths = sorted(glob.glob(f"{I18N}/*bookworm_main_i18n_Translation-{code}.*")
                   + glob.glob(f"{I18N}/*bookworm_main_i18n_Translation-{code}"))
    docs = {}
    for path in paths:
        for st in stanzas(cat(path)):
            name, md5, raw = st.get("Package"), st.get("Description-md5"), st.get(f"Description-{lang}")
            if name and md5 and raw and name not in docs and long_description(raw):
                docs[name] = (md5, raw.split("\n")[0].strip(), long_description(raw))
    return dict(sorted(docs.items()))


def available():
    """The languages whose list is there (what scripts/setup.sh fetched), English aside."""
    found = {re.sub(r"\.(lz4|xz|gz)$", "", p.rsplit("_Translation-", 1)[1]).replace("%5f", "_")
             for p in glob.glob(f"{I18N}/*bookworm_main_i18n_Translation-*")}
    return sorted(found - {"en"})


def aligned(lang, english=None):
    """{package: (english (synopsis, long), translated (synopsis, long))} where the translation is
    of the current English text, in a fixed pseudo-random order (md5 of the name)."""
    english = english or descriptions("en")
    pairs = {}
    for name, (md5, syn, body) in descriptions(lang).items():
        en = english.get(name)
        if en and en[0] == md5 and not _same(en[2], body):
            pairs[name] = ((en[1], en[2]), (syn, body))
    return dict(sorted(pairs.items(), key=lambda kv: hashlib.md5(kv[0].encode()).hexdigest()))


def _same(a, b):
    # an untranslated copy of the English text teaches nothing about another language
    squash = lambda s: re.sub(r"\s+", " ", s).strip().lower()
    return squash(a) == squash(b)
