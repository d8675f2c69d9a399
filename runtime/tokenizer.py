"""The CLIP text tokenizer without torch: byte-level BPE giving the same token ids as open_clip's
``SimpleTokenizer`` (the tokenizer of every backbone the export writes, context length 77).

What it reproduces, step by step:

1. cleaning: ``ftfy.fix_text`` (see below), HTML entities decoded twice (``html.unescape``),
   surrounding whitespace stripped, every run of whitespace made one space, lower case;
2. splitting into pieces with the CLIP pattern: the two special tokens written out, the English
   contractions ('s 't 're 've 'm 'll 'd), runs of letters, single digits (any Unicode number), and
   runs of anything else that is neither whitespace, letter nor number; whitespace is dropped;
3. each piece as UTF-8 bytes, each byte shown as one printable character (the bytes ``!``..``~``,
   ``¡``..``¬`` and ``®``..``ÿ`` stand for themselves, the 68 others for U+0100 onwards in byte
   order), the last character marked end-of-word (``</w>``);
4. merges from the vocabulary file: the adjacent pair of lowest rank is joined everywhere in the
   piece (left to right), until no pair of the piece is a merge;
5. ids: the 256 byte characters, the same with ``</w>``, one per merge in file order,
   ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407);
6. rows of ``context_length``: start id, the piece ids, end id, zeros; a longer row is cut to
   ``context_length`` ids and its last id replaced by the end id.

``ftfy``: open_clip runs ``ftfy.fix_text`` first. When ftfy is importable this tokenizer does the
same (``fix_text="auto"`` or ``True``), and every string is tokenized as open_clip does. Without it
(``fix_text=False``, or ``"auto"`` where ftfy is missing) it does what ftfy 6.3.1 was measured to
do to single characters (deletes some controls and format characters, replaces ligatures and
full-width and half-width forms by their compatibility forms, straightens curly quotes, NFC), and
refuses with a ``ValueError`` naming the string what it cannot tell without ftfy: C1 controls,
the escape of terminal colour codes, HTML entities nested more than twice or written in capitals
(ftfy decodes them), entities that decode to a character ftfy changes, and text that could be UTF-8
read in one of the single-byte codepages ftfy repairs (mojibake). ftfy's mojibake test is a
heuristic not reproduced here, so that last refusal is conservative: ASCII, CJK, emoji and most
accented text pass; some Latin-1, Greek or Cyrillic letters next to symbols or spaces are refused.
"""

from __future__ import annotations

import gzip
import html
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import regex

CONTEXT_LENGTH = 77
START = "<start_of_text>"
END = "<end_of_text>"
END_OF_WORD = "</w>"
N_MERGES = 49152 - 256 - 2  # merges read from the vocabulary file (the lines after its header)

_PIECES = regex.compile(
    "|".join(re.escape(t) for t in (START, END))
    + r"|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def byte_characters() -> dict[int, str]:
    """Byte -> the character that stands for it in the BPE vocabulary (in vocabulary order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return table


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The merges of a CLIP BPE vocabulary file (gzip or plain text: a header line, then one
    space-separated pair per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer vocabulary {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"tokenizer vocabulary {path} is not a CLIP BPE merge list "
                         f"({N_MERGES} pairs after a header line)")
    return merges  # type: ignore[return-value]


class Tokenizer:
    """Strings -> int64 token ids [N, context_length], equal to open_clip's ``SimpleTokenizer``.

    ``vocabulary``: the BPE file (open_clip's ``bpe_simple_vocab_16e6.txt.gz``, or its copy in an
    artifact folder). ``fix_text``: "auto" (use ftfy when importable), True (require it) or False
    (never; refuse the strings ftfy would change, see the module's text).
    """

    def __init__(self, vocabulary: str | os.PathLike, context_length: int = CONTEXT_LENGTH,
                 fix_text: bool | str = "auto"):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        self.context_length = int(context_length)
        self.byte_chars = byte_characters()
        merges = read_merges(vocabulary)
        symbols = list(self.byte_chars.values())
        symbols += [s + END_OF_WORD for s in symbols]
        symbols += ["".join(m) for m in merges]
        symbols += [START, END]
        self.ids = {s: i for i, s in enumerate(symbols)}
        self.vocab_size = len(self.ids)
        self.start_id, self.end_id = self.ids[START], self.ids[END]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self._known: dict[str, list[int]] = {START: [self.start_id], END: [self.end_id]}
        self._fix = _load_ftfy(fix_text)

    @property
    def uses_ftfy(self) -> bool:
        return self._fix is not None

    # -- cleaning ---------------------------------------------------------------------------
    def clean(self, text: str) -> str:
        """The text as open_clip's "lower" cleaning leaves it."""
        if not isinstance(text, str):
            raise TypeError(f"the tokenizer takes strings, got {type(text).__name__}")
        if self._fix is not None:
            fixed = self._fix(text)
        else:
            fixed = fix_without_ftfy(text)
        fixed = html.unescape(html.unescape(fixed)).strip()
        return " ".join(fixed.split()).lower()

    # -- BPE ----------------------------------------------------------------------------------
    def _merge(self, piece: str) -> list[int]:
        known = self._known.get(piece)
        if known is not None:
            return known
        word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        ranks = self.ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            joined, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    joined.append(first + second)
                    i += 2
                else:
                    joined.append(word[i])
                    i += 1
            word = joined
        out = [self.ids[s] for s in word]
        if len(self._known) < 100_000:
            self._known[piece] = out
        return out

    def encode(self, text: str) -> list[int]:
        """The BPE ids of one string, without start and end ids."""
        ids: list[int] = []
        for piece in _PIECES.findall(self.clean(text)):
            ids.extend(self._merge("".join(self.byte_chars[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: str | Sequence[str] | Iterable[str], context_length: int | None = None) -> np.ndarray:
        """int64 [N, context_length]: start id, ids, end id, zero padding (cut rows end with the end id)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be at least 2, got {length}")
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.end_id
            out[row, : len(ids)] = ids
        return out


def _load_ftfy(fix_text: bool | str):
    if fix_text not in (True, False, "auto"):
        raise ValueError(f"fix_text must be True, False or 'auto', got {fix_text!r}")
    if fix_text is False:
        return None
    try:
        import ftfy
    except ImportError:
        if fix_text is True:
            raise ImportError("the tokenizer was asked to use ftfy, which is not installed: pip install ftfy") from None
        return None
    return ftfy.fix_text


# ---------------------------------------------------------------------------------------------
# What ftfy could change (for the tokenizer without ftfy)

# What ftfy 6.3.1 does to single characters, measured code point by code point (alone, between
# letters, between spaces) against NFC: the characters it deletes, those it replaces by their
# compatibility form (NFKC: ligatures, full-width and half-width forms), the quotes it straightens,
# and the ones refused here (C1 controls, which it reads as Windows-1252, the escape that starts a
# terminal colour code, surrogates). Other code points: only NFC. (start, end) inclusive.
_DELETED = ((0x0000, 0x0008), (0x000B, 0x000B), (0x000E, 0x001A), (0x001C, 0x001F), (0x007F, 0x007F),
            (0x206A, 0x206F), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFC))
_COMPATIBLE = ((0x0132, 0x0133), (0x01C4, 0x01CC), (0x01F1, 0x01F3), (0xFB00, 0xFB04), (0xFB06, 0xFB06),
               (0xFF01, 0xFF01), (0xFF03, 0xFF06), (0xFF08, 0xFFBE), (0xFFC2, 0xFFC7), (0xFFCA, 0xFFCF),
               (0xFFD2, 0xFFD7), (0xFFDA, 0xFFDC), (0xFFE0, 0xFFE6), (0xFFE8, 0xFFEE))
_QUOTES = {**dict.fromkeys((0x02BC, 0x2018, 0x2019, 0x201A, 0x201B, 0xFF07), "'"),
           **dict.fromkeys((0x201C, 0x201D, 0x201E, 0x201F, 0xFF02), '"')}
_OTHERS = {0x0149: "'n", 0xFB05: "\u017ft"}  # ŉ -> 'n, the ligature ſt -> ſ t
_REFUSED = ((0x001B, 0x001B), (0x0080, 0x009F), (0xD800, 0xDFFF))


def _fix_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for start, end in _DELETED:
        table.update(dict.fromkeys(range(start, end + 1), ""))
    for start, end in _COMPATIBLE:
        table.update({cp: unicodedata.normalize("NFKC", chr(cp)) for cp in range(start, end + 1)})
    table.update(_QUOTES)
    table.update(_OTHERS)
    return table


_FIXES = _fix_table()

_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")

# The single-byte codepages ftfy reads mojibake in (the sloppy ones also map their unused bytes to
# the C1 controls, which are refused above, and byte 0x1A to U+FFFD).
_CODEPAGES = ("latin-1", "cp1252", "cp1251", "cp1250", "cp1253", "cp1254", "cp1257", "iso8859-2",
              "mac-roman", "cp437")


def _codepage_tables() -> list[dict[str, int]]:
    tables = []
    for codepage in _CODEPAGES:
        table = {chr(b): b for b in range(128)}
        for b in range(128, 256):
            try:
                table.setdefault(bytes([b]).decode(codepage), b)
            except UnicodeDecodeError:
                table.setdefault(chr(b), b)  # the sloppy reading of an unused byte
        table.setdefault("\ufffd", 0x1A)
        tables.append(table)
    return tables


_TABLES = _codepage_tables()


def _stand_ins(codepage: str) -> tuple[int, ...]:
    """Bytes that ftfy takes for a lost continuation byte in ``codepage``: a space (a no-break space
    that became one), except in Mac Roman; in the Windows codepages also '?' and 0x1A (U+FFFD)."""
    return ((0x20,) if codepage != "mac-roman" else ()) + ((0x3F, 0x1A) if codepage.startswith("cp125") else ())


def _sequence_length(lead: int) -> int:
    return 1 if 0xC0 <= lead <= 0xDF else 2 if 0xE0 <= lead <= 0xEF else 3 if 0xF0 <= lead <= 0xF4 else -1


def _could_be_utf8(data: bytes, stand_ins: tuple[int, ...]) -> bool:
    """Whether ``data`` (with a byte >= 0x80) could read as UTF-8, a stand-in after a lead byte
    counting as a continuation byte."""
    if max(data, default=0) < 0x80:
        return False
    i = 0
    while i < len(data):
        if data[i] < 0x80:
            i += 1
            continue
        need = _sequence_length(data[i])
        if need < 0 or i + need >= len(data):
            return False
        if not all(0x80 <= c <= 0xBF or c in stand_ins for c in data[i + 1 : i + need + 1]):
            return False
        i += need + 1
    return True


def _mojibake_reason(text: str) -> str:
    """Why ftfy might take (part of) ``text`` for UTF-8 read in one of its codepages: a lead
    character followed by as many continuation characters (or stand-ins) as UTF-8 needs, all in one
    codepage, or a whole line that reads as UTF-8 there."""
    for codepage, table in zip(_CODEPAGES, _TABLES):
        stand_ins = _stand_ins(codepage)
        codes = [table.get(c, -1) for c in text]
        for i, lead in enumerate(codes):
            need = _sequence_length(lead) if lead >= 0x80 else -1
            if need < 0 or i + need >= len(codes):
                continue
            if all(0x80 <= c <= 0xBF or c in stand_ins for c in codes[i + 1 : i + need + 1]):
                return f"{text[i : i + need + 1]!r} reads like UTF-8 decoded as {codepage}"
        for line in text.split("\n"):
            data = [table.get(c, -1) for c in line]
            if -1 not in data and _could_be_utf8(bytes(data), stand_ins):
                return f"the line {line!r} could be UTF-8 decoded as {codepage}"
    return ""


_REFUSED_RE = re.compile("[" + "".join(f"\\U{a:08X}-\\U{b:08X}" for a, b in _REFUSED) + "]")


def _refused_character(text: str) -> str:
    match = _REFUSED_RE.search(text)
    if match is None:
        return ""
    for c in match.group():
        cp = ord(c)
        if any(start <= cp <= end for start, end in _REFUSED):
            return f"ftfy rewrites U+{cp:04X} {unicodedata.name(c, '(a control character or surrogate)')} depending on its neighbours"
    return ""


def _unknown_entity(decoded: str) -> str:
    for match in _ENTITY.finditer(decoded):
        entity = match.group()
        if entity.startswith("&#") or html.unescape(entity.lower()) != entity.lower():
            return entity
    return ""


def fix_without_ftfy(text: str) -> str:
    """``text`` as ftfy.fix_text leaves it, where that needs no ftfy; ValueError saying why otherwise."""
    reason = ftfy_would_change(text)
    if reason:
        raise ValueError(f"cannot tokenize {text!r} without ftfy: {reason}; install ftfy (pip install ftfy) "
                         "or write the text without it")
    return unicodedata.normalize("NFC", text.translate(_FIXES))


def ftfy_would_change(text: str) -> str:
    """Why this tokenizer cannot tell what ftfy makes of ``text`` ("" when it can: ftfy then changes
    only the characters of the measured table, and NFC)."""
    reason = _refused_character(text) or ("" if text.isascii() else _mojibake_reason(text))
    if reason:
        return reason
    fixed = unicodedata.normalize("NFC", text.translate(_FIXES))
    decoded = html.unescape(html.unescape(fixed))
    if html.unescape(decoded) != decoded:
        return "it holds HTML entities nested more than twice (ftfy decodes them all)"
    entity = _unknown_entity(decoded)
    if entity:
        return f"it holds the HTML entity {entity}, which ftfy decodes and html.unescape does not"
    if decoded != fixed:
        for c in decoded:
            if ord(c) in _FIXES or _refused_character(c):
                return f"an HTML entity in it decodes to U+{ord(c):04X}, which ftfy may change"
        if unicodedata.normalize("NFC", decoded) != decoded:
            return "HTML entities in it decode to text that is not NFC-normal"
    if fixed != text and not fixed.isascii():
        reason = _mojibake_reason(fixed)
    if not reason and decoded != fixed and not decoded.isascii():
        reason = _mojibake_reason(decoded)
    return reason
