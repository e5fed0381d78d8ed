"""Texts for the multilingual model's tests: a few per script, written to reach the corners of a
tokeniser (combining marks, emoji sequences, full- and half-width forms, odd spaces, controls),
next to the Debian descriptions (scripts/shared/translations.py) that carry the bulk."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from shared import translations  # noqa: E402

SCRIPTS = {
    "latin": ["Der schnelle braune Fuchs springt über den faulen Hund.", "Ça coûte 15 € à Zürich, naïve café façade.",
              "Źdźbło trawy, żółw i łódź na jeziorze.", "Tiếng Việt có dấu: người, được, những."],
    "cyrillic": ["Съешь же ещё этих мягких французских булок.", "Ґанок, їжак, євшан-зілля."],
    "greek": ["Η γρήγορη καφέ αλεπού πηδάει πάνω από τον σκύλο."],
    "arabic": ["نص عربي من اليمين إلى اليسار", "قاعدة البيانات تحفظ المتجهات بجانب الجدول، ١٢٣٤٥.",
               "فارسی: این یک جملهٔ آزمایشی است."],
    "hebrew": ["עברית היא שפה שנכתבת מימין לשמאל"],
    "devanagari": ["हिन्दी पाठ का परीक्षण", "डेटाबेस में वेक्टर संग्रहीत होते हैं।", "क़िला और ज़मीन"],
    "bengali_tamil": ["বাংলা ভাষায় লেখা বাক্য।", "தமிழ் மொழி ஒரு செம்மொழி."],
    "thai": ["ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ"],
    "georgian_armenian": ["ქართული ენა", "Հայերեն լեզու"],
    "cjk": ["日本語のテキストを埋め込みます。東京は日本の首都です。", "中文文本嵌入测试，北京是中国的首都。",
            "한국어 문장 임베딩 테스트입니다.", "繁體中文：資料庫與向量。"],
    "widths": ["ＦＵＬＬ　ＷＩＤＴＨ　１２３", "ｶﾀｶﾅ ﾊﾝｶｸ", "ｶﾞｷﾞｸﾞ ﾊﾟﾋﾟ", "①②③ ㈱ ㎏ ﬁ ﬂ Ⅻ"],
    "emoji": ["Emoji: 🎉🚀🐘 are fun 😀", "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇩🇪🇯🇵 flags", "❤️ ☺️ ✈️", "🫠🪿 new ones"],
    "combining": ["Combining marks: e\u0301 a\u0300 o\u0308 n\u0303", "Z\u0351\u0364a\u0357l\u0308g\u0301o\u0303",
                  "Vie\u0323\u0302t Nam", "a\u0308\u0301\u0323"],
    "spaces_controls": ["tabs\there\tand\nnew\r\nlines", "no\u00a0break\u2009thin\u3000ideographic",
                        "zero\u200bwidth\u200djoiner\ufeffbom", "  leading and trailing  ", "bell\x07 and\x1b escape",
                        "soft\u00adhyphen", "", " ", "a"],
}


def samples():
    """(label, text) for every hand-written text."""
    return [(script, text) for script, texts in SCRIPTS.items() for text in texts]


def debian(per_language, languages=None, min_chars=1):
    """(language, text) of translated synopses and long descriptions, `per_language` of each."""
    english = translations.descriptions("en")
    out = []
    for lang in languages or translations.available():
        pairs = translations.aligned(lang, english)
        texts = [t for _, (_, (syn, body)) in pairs.items() for t in (syn, body) if len(t) >= min_chars]
        out += [(lang, t) for t in texts[:per_language]]
    return out
