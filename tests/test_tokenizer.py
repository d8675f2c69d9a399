"""The runtime's tokenizer (runtime/tokenizer.py) against open_clip's SimpleTokenizer: the prompt
ensemble of every MVTec AD and VisA class, and seeded strings of every awkward kind."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from test_runtime_without_torch import run_blocked

open_clip = pytest.importorskip("open_clip", reason="open_clip (the export extra) is the reference the tokenizer is checked against")

from anoclip.runtime.prompts import PromptRecipe  # noqa: E402
from anoclip.runtime.classes import MVTEC_CLASSES, VISA_CLASSES  # noqa: E402
from anoclip.runtime.tokenizer import Tokenizer, ftfy_would_change  # noqa: E402

BACKBONE = "ViT-B-16-plus-240"

WORDS = ("a", "photo", "of", "the", "bottle", "screw", "metal", "nut", "scratch", "crack", "hole", "dent",
         "defect", "with", "without", "inspection", "industrial", "surface", "PCB", "Macaroni", "pipe_fryum",
         "chewinggum", "x-ray", "well-known", "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd",
         "IT'S", "WE'LL", "O'Neil", "rock'n'roll", "3D", "v2.0", "1080p", "2026", "100%", "$42", "#7", "@home",
         "e-mail", "C++", "a/b", "foo_bar", "mm²", "½", "Ⅻ", "٣", "१२", "<start_of_text>", "<END_OF_TEXT>",
         "<b>", "</w>", "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis")
ACCENTED = ("café", "naïve", "Zürich", "Ångström", "façade", "crème brûlée", "São Paulo", "Łódź", "Dvořák",
            "Straße", "ÉCOLE", "jalapeño", "smörgåsbord", "Ærøskøbing", "Kraków", "İstanbul", "Čapek", "Øre",
            "cafe\u0301", "A\u030angstro\u0308m", "n\u0303", "Ελληνικά", "русский текст", "עברית", "العربية",
            "हिन्दी", "ไทย", "ქართული", "Tiếng Việt", "ſtraße")
CJK = ("中文", "日本語のテキスト", "漢字", "한국어", "ひらがな", "カタカナ", "繁體中文字", "𠀀𠀁")
EMOJI = ("😀", "👍🏽", "👨\u200d👩\u200d👧", "🇩🇪", "❤️", "🔩", "⚙", "✔", "🧪🧫", "☃")
PUNCTUATION = ("!!!", "...", "?!", "--", "(*&^%)", "'", "''", "'s", "'LL", ":-)", "[x]", "{}", "~~~", "¿", "¡",
               "«»", "—", "–", "…", "•", "§", "©", "®", "™", "°C", "±", "×", "÷", "→", "∞", "≤", "“quoted”")
ENTITIES = ("&amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&amp;amp;", "&nbsp;", "&#x27;", "&copy;", "&eacute;",
            "&#233;", "&#x1F600;", "&amp", "&lt", "AT&T", "&foo;", "&amp;lt;", "&#60;")
SPACES = (" ", "  ", "\t", "\n", "\r\n", "\xa0", "\u2003", "\u3000", " \t\n ", "\u2028", "\x0b", "\x0c")


def _generated(seed: int = 0, count: int = 1600) -> list[str]:
    rng = random.Random(seed)
    pools = (WORDS, WORDS, ACCENTED, CJK, EMOJI, PUNCTUATION, ENTITIES)
    out = [*WORDS, *ACCENTED, *CJK, *EMOJI, *PUNCTUATION, *ENTITIES, *SPACES, ""]
    for i in range(count):
        n = rng.randint(1, 12) if i % 10 else rng.randint(60, 120)  # every tenth: past the context length
        parts = []
        for _ in range(n):
            parts.append(rng.choice(rng.choice(pools)))
            parts.append(rng.choice(SPACES) if rng.random() < 0.3 else (" " if rng.random() < 0.8 else ""))
        text = "".join(parts)
        if rng.random() < 0.1:
            text = rng.choice(SPACES) + text + rng.choice(SPACES)
        out.append(text)
    return out


# Strings ftfy changes (or may change) beyond NFC: the tokenizer without ftfy refuses them or tokenizes
# them as open_clip does.
FTFY_STRINGS = ("Ã©cole", "caf\u00c3\u00a9", "voilÃ le travail", "â€œquotedâ€\x9d", "“curly” ‘quotes’", "don’t",
                "ﬁne ﬂow", "ＦＵＬＬ ｗｉｄｔｈ １２３", "ｶﾀｶﾅ", "a\x00b", "a\x1b[31mred", "a\x85b", "a\u200bb",
                "\ufeffbom", "P&EACUTE;REZ", "&amp;amp;lt;", "&rsquo;", "&#8217;", "&#128;", "soft\u00adhyphen",
                "Ĳssel", "\udce9", "ÃƒÂ©", "Ñ ", "cafe&#769;", "<b>&rsquo;</b>", "ｶﾞｷﾞ", "ŉ ﬅ", "a\x0bb\x0cc",
                "\xa0°C", "&foo; &EACUTE;", "don&#39;t")


@pytest.fixture(scope="module")
def reference():
    tokenizer = open_clip.get_tokenizer(BACKBONE)
    assert type(tokenizer).__name__ == "SimpleTokenizer" and tokenizer.context_length == 77
    return tokenizer


@pytest.fixture(scope="module")
def vocabulary():
    from open_clip.tokenizer import default_bpe

    return default_bpe()


def _ensemble(name: str) -> list[str]:
    normal, abnormal = PromptRecipe.for_class(name).sentences()
    return normal + abnormal


def _reference_ids(reference, texts: list[str]) -> np.ndarray:
    return np.concatenate([reference(texts[i : i + 1000]).numpy() for i in range(0, len(texts), 1000)])


def test_tiny_test_model_gets_the_same_tokenizer(tmp_path):
    from conftest import TINY_BACKBONE, TINY_CONFIG

    open_clip.add_model_config(TINY_CONFIG)
    tokenizer = open_clip.get_tokenizer(TINY_BACKBONE)
    assert type(tokenizer).__name__ == "SimpleTokenizer" and tokenizer.context_length == 77


@pytest.mark.parametrize("fix_text", [True, False])
def test_prompt_ensembles_equal_open_clip(reference, vocabulary, fix_text):
    ours = Tokenizer(vocabulary, fix_text=fix_text)
    texts = [s for name in (*MVTEC_CLASSES, *VISA_CLASSES) for s in _ensemble(name)]
    assert len(texts) == 27 * 3 * 22 * 14
    got = ours(texts)
    assert got.dtype == np.int64 and got.shape == (len(texts), 77)
    np.testing.assert_array_equal(got, _reference_ids(reference, texts))
    print(f"prompt ensembles: {len(texts)} sentences compared (fix_text={fix_text}), all equal")


def _compare(ours: Tokenizer, reference, texts: list[str]) -> tuple[list[str], list[str]]:
    refused, differ = [], []
    want = _reference_ids(reference, texts)
    for text, row in zip(texts, want):
        try:
            got = ours([text])[0]
        except ValueError:
            refused.append(text)
            continue
        if not np.array_equal(got, row):
            differ.append(text)
    return refused, differ


def test_generated_strings_equal_open_clip_with_ftfy(reference, vocabulary):
    texts = _generated() + list(FTFY_STRINGS)
    refused, differ = _compare(Tokenizer(vocabulary, fix_text=True), reference, texts)
    print(f"generated strings with ftfy: {len(texts)} compared, {len(refused)} refused, {len(differ)} differ")
    assert not refused and not differ, differ[:5]


def test_generated_strings_equal_open_clip_without_ftfy(reference, vocabulary):
    texts = _generated()
    long = sum(len(reference.encode(t)) + 2 > 77 for t in texts)
    assert long >= 100
    refused, differ = _compare(Tokenizer(vocabulary, fix_text=False), reference, texts)
    print(f"generated strings without ftfy: {len(texts)} compared ({long} past the context), "
          f"{len(refused)} refused, {len(differ)} differ")
    for text in refused[:20]:
        print("  refused", repr(text)[:120], "->", ftfy_would_change(text)[:100])
    assert not differ, [repr(t) for t in differ[:5]]
    # Without ftfy the refusal is conservative (ftfy's mojibake heuristic is not reproduced): it
    # refuses a share of the strings with Latin-1, Greek or Cyrillic letters next to symbols or spaces.
    assert len(refused) < len(texts) // 4


def test_strings_ftfy_changes_are_refused_or_equal_without_ftfy(reference, vocabulary):
    ours = Tokenizer(vocabulary, fix_text=False)
    refused, differ = _compare(ours, reference, list(FTFY_STRINGS))
    for text in refused:
        print("  refused", repr(text), "->", ftfy_would_change(text))
    assert not differ, [repr(t) for t in differ]
    with pytest.raises(ValueError, match="Ã©cole"):
        ours(["Ã©cole"])


def test_truncation_keeps_the_end_token(reference, vocabulary):
    ours = Tokenizer(vocabulary)
    text = " ".join(["bottle"] * 200)
    got = ours([text, "bottle"])
    np.testing.assert_array_equal(got, reference([text, "bottle"]).numpy())
    assert got[0, -1] == ours.end_id == 49407 and got[0, 0] == ours.start_id == 49406
    assert got[1, :3].tolist() == [49406, got[1, 1], 49407] and not got[1, 3:].any()


def test_ensemble_speed(vocabulary):
    texts = _ensemble("metal_nut")
    cold = Tokenizer(vocabulary)
    start = time.perf_counter()
    cold(texts)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cold(texts)
    again = time.perf_counter() - start
    start = time.perf_counter()
    Tokenizer(vocabulary)
    load = time.perf_counter() - start
    print(f"one class's ensemble ({len(texts)} sentences): {first * 1e3:.1f} ms first, {again * 1e3:.1f} ms "
          f"again; reading the vocabulary {load * 1e3:.0f} ms")


def test_imports_and_tokenizes_without_torch(reference, vocabulary):
    proc = run_blocked(
        """
        import json
        from anoclip.runtime.tokenizer import Tokenizer
        ids = Tokenizer(sys.argv[1], fix_text=False)(["a photo of a damaged metal_nut", "café 中文 😀"])
        leaked = [m for m in sys.modules if m.split(".")[0] in Block.blocked]
        assert not leaked, leaked
        print(json.dumps(ids.tolist()))
        """,
        vocabulary,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    want = reference(["a photo of a damaged metal_nut", "café 中文 😀"]).numpy().tolist()
    assert json.loads(proc.stdout) == want
