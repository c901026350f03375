#!/usr/bin/env python3
"""Writes engine/unicode_tables.inc: the Unicode tables the tokenizer needs.

Usage: python3 scripts/gen_unicode_tables.py [OUTPUT]   (default: engine/unicode_tables.inc)

Uses only the Python standard library (unicodedata). The tables are:
  * kCodePointClassRanges: sorted, disjoint [first, last] ranges with class bits
      letter (general category L*), number (N*), whitespace (the White_Space property), and
      word (what Rust's regex `\\w` matches: Alphabetic, marks, Nd, Pc, Join_Control).
    These are the classes that Oniguruma's \\p{L}, \\p{N}, \\s use in the pre-tokenizer regexes.
  * kCombiningClassRanges: canonical combining class (ccc) of every code point whose ccc != 0.
  * kCanonicalDecompositions: one level of canonical decomposition (1 or 2 code points).
  * kCanonicalCompositions: primary composites (pairs that NFC recomposes), sorted by pair.

Hugging Face tokenizers uses Oniguruma 6.9.10 (Unicode 16.0). When this Python's Unicode
database is older, the letters and numbers assigned since then (listed below; they are
unassigned, category Cn, in the older database) are added so that the classes match.
Its NFC normalizer, however, uses Unicode 9.0 data (the unicode-normalization-alignments crate):
the combining marks and the decomposition added since then (listed below, found by comparing
its output on every code point) are treated as starters without decomposition here too, so
that NFC matches it exactly.
"""

import sys
import unicodedata

# Letters (L*) and numbers (N*) assigned in Unicode 15.0 - 16.0, as Oniguruma 6.9.10 classifies
# them. Applied only to code points that the local database reports as unassigned.
_LETTERS_SINCE_14 = """
1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 1123F-11240
11380-11389 1138B-1138B 1138E-1138E 11390-113B5 113B7-113B7 113D1-113D1 113D3-113D3
11BC0-11BE0 11F02-11F02 11F04-11F10 11F12-11F33 1342F-1342F 13441-13446 13460-143FA
16100-1611D 16D40-16D6C 18CFF-18CFF 1B132-1B132 1B155-1B155 1DF25-1DF2A 1E030-1E06D
1E4D0-1E4EB 1E5D0-1E5ED 1E5F0-1E5F0 2B739-2B739 2EBF0-2EE5D 31350-323AF
"""
_NUMBERS_SINCE_14 = """
10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16D70-16D79 1CCF0-1CCF9
1D2C0-1D2D3 1E4F0-1E4F9 1E5F1-1E5FA
"""

# Punctuation (P*), symbols (S*) and marks (M*) assigned in Unicode 15.0 - 16.0: the regex engine
# adds them to a Unicode 14 \\p{P} / \\p{S} / \\p{M}. Found by asking Hugging Face tokenizers
# (Oniguruma 6.9.10, npm `tokenizers` 0.23.2) which code points unassigned in Unicode 14 match
# each class (a Split pre-tokenizer with behavior Removed); its answers for \\p{L} and \\p{N}
# are exactly the two lists above.
_PUNCTUATION_SINCE_14 = """
1B4E-1B4F 1B7F-1B7F 10D6E-10D6E 113D4-113D5 113D7-113D8 11B00-11B09 11BE1-11BE1 11F43-11F4F
16D6D-16D6F 1E5FF-1E5FF
"""
_SYMBOLS_SINCE_14 = """
2427-2429 2FFC-2FFF 31E4-31E5 31EF-31EF 10D8E-10D8F 1CC00-1CCEF 1CD00-1CEB3 1F6DC-1F6DC
1F774-1F776 1F77B-1F77F 1F7D9-1F7D9 1F8B2-1F8BB 1F8C0-1F8C1 1FA75-1FA77 1FA87-1FA89 1FA8F-1FA8F
1FAAD-1FAAF 1FABB-1FABF 1FAC6-1FAC6 1FACE-1FACF 1FADA-1FADC 1FADF-1FADF 1FAE8-1FAE9 1FAF7-1FAF8
1FBCB-1FBEF
"""
_MARKS_SINCE_14 = """
897-897 CF3-CF3 ECE-ECE 10D69-10D6D 10EFC-10EFF 11241-11241 113B8-113C0 113C2-113C2 113C5-113C5
113C7-113CA 113CC-113D0 113D2-113D2 113E1-113E2 11F00-11F01 11F03-11F03 11F34-11F3A 11F3E-11F42
11F5A-11F5A 13440-13440 13447-13455 1611E-1612F 1E08F-1E08F 1E4EC-1E4EF 1E5EE-1E5EF
"""

# Combining marks (ccc != 0) assigned after Unicode 9.0, up to the local database's version:
# Hugging Face's NFC gives them combining class 0.
_CCC_UNKNOWN_TO_HF = """
7FD-7FD 898-89F 8CA-8D3 9FE-9FE C3C-C3C D3B-D3C EBA-EBA 1715-1715 1ABF-1ACE 1DF6-1DFA A82C-A82C
10D24-10D27 10EAB-10EAC 10F46-10F50 10F82-10F85 11070-11070 1133B-1133B 1145E-1145E 11839-1183A
1193D-1193E 11943-11943 119E0-119E0 11A34-11A34 11A47-11A47 11A99-11A99 11D42-11D42 11D44-11D45
11D97-11D97 16FF0-16FF1 1E130-1E136 1E2AE-1E2AE 1E2EC-1E2EF
"""
# Canonical decompositions added after Unicode 9.0: Hugging Face's NFC neither decomposes nor
# composes them.
_DECOMPOSITIONS_UNKNOWN_TO_HF = [0x11938]

# The White_Space property (stable since Unicode 6.3).
_WHITESPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
               (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
               (0x3000, 0x3000)]

# Other_Alphabetic code points that are neither marks nor letters (circled/squared letters).
_OTHER_ALPHABETIC_SYMBOLS = [(0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169),
                             (0x1F170, 0x1F189)]

LETTER, NUMBER, WHITESPACE, WORD = 1, 2, 4, 8
MAX_CP = 0x10FFFF


def _parse_ranges(text):
    out = []
    for item in text.split():
        a, b = item.split("-")
        out.append((int(a, 16), int(b, 16)))
    return out


def _is_surrogate(cp):
    return 0xD800 <= cp <= 0xDFFF


def class_bits():
    """Returns a list of class bits for every code point."""
    bits = [0] * (MAX_CP + 1)
    for cp in range(MAX_CP + 1):
        if _is_surrogate(cp):
            continue
        cat = unicodedata.category(chr(cp))
        b = 0
        if cat[0] == "L":
            b |= LETTER | WORD
        elif cat[0] == "N":
            b |= NUMBER
            if cat in ("Nd", "Nl"):
                b |= WORD
        elif cat[0] == "M" or cat == "Pc":
            b |= WORD
        bits[cp] = b
    for extra, flag in ((_LETTERS_SINCE_14, LETTER | WORD), (_NUMBERS_SINCE_14, NUMBER | WORD)):
        for a, b in _parse_ranges(extra):
            for cp in range(a, b + 1):
                if unicodedata.category(chr(cp)) == "Cn":
                    bits[cp] |= flag
    for a, b in _WHITESPACE:
        for cp in range(a, b + 1):
            bits[cp] |= WHITESPACE
    for a, b in _OTHER_ALPHABETIC_SYMBOLS:
        for cp in range(a, b + 1):
            bits[cp] |= WORD
    for cp in (0x200C, 0x200D):  # Join_Control
        bits[cp] |= WORD
    return bits


def ranges_of(values):
    """Compresses a per-code-point list into (first, last, value) runs with value != 0."""
    out = []
    for cp, v in enumerate(values):
        if v == 0:
            continue
        if out and out[-1][1] == cp - 1 and out[-1][2] == v:
            out[-1][1] = cp
        else:
            out.append([cp, cp, v])
    return out


def decompositions():
    """Returns sorted (cp, first, second) one-level canonical decompositions (second 0 if none)."""
    out = []
    for cp in range(MAX_CP + 1):
        if _is_surrogate(cp):
            continue
        d = unicodedata.decomposition(chr(cp))
        if not d or d.startswith("<") or cp in _DECOMPOSITIONS_UNKNOWN_TO_HF:
            continue
        parts = [int(x, 16) for x in d.split()]
        assert 1 <= len(parts) <= 2, hex(cp)
        out.append((cp, parts[0], parts[1] if len(parts) == 2 else 0))
    return out


def compositions(decomps):
    """Returns (first, second, composite) for primary composites, sorted by (first, second)."""
    out = []
    for cp, a, b in decomps:
        if b == 0:
            continue  # Singletons never recompose.
        if unicodedata.normalize("NFC", chr(cp)) != chr(cp):
            continue  # Composition exclusion or non-starter decomposition.
        out.append((a, b, cp))
    out.sort()
    return out


def _pack(items, width=100):
    """Joins table entries into lines of at most `width` characters."""
    lines, cur = [], "   "
    for item in items:
        if len(cur) + 1 + len(item) > width:
            lines.append(cur)
            cur = "   "
        cur += " " + item
    if cur.strip():
        lines.append(cur)
    return lines


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "engine/unicode_tables.inc"
    classes = ranges_of(class_bits())
    ccc_values = [0 if _is_surrogate(cp) else unicodedata.combining(chr(cp))
                  for cp in range(MAX_CP + 1)]
    for a, b in _parse_ranges(_CCC_UNKNOWN_TO_HF):
        for cp in range(a, b + 1):
            ccc_values[cp] = 0
    ccc = ranges_of(ccc_values)
    decomps = decompositions()
    comps = compositions(decomps)
    lines = [
        "// Generated by scripts/gen_unicode_tables.py from Python's unicodedata "
        f"(Unicode {unicodedata.unidata_version}).",
        "// Do not edit by hand. Included only by engine/tokenizer/unicode.cc.",
        "",
        f'constexpr char kUnicodeDataVersion[] = "{unicodedata.unidata_version}";',
        "",
        "// {first, last, class bits}: 1 letter, 2 number, 4 whitespace, 8 word (regex \\w).",
        f"constexpr ClassRange kCodePointClassRanges[{len(classes)}] = {{",
    ]
    lines += _pack([f"{{0x{a:X}, 0x{b:X}, {v}}}," for a, b, v in classes])
    for name, extra in (("kLettersAfterUnicode14", _LETTERS_SINCE_14),
                        ("kNumbersAfterUnicode14", _NUMBERS_SINCE_14),
                        ("kPunctuationAfterUnicode14", _PUNCTUATION_SINCE_14),
                        ("kSymbolsAfterUnicode14", _SYMBOLS_SINCE_14),
                        ("kMarksAfterUnicode14", _MARKS_SINCE_14)):
        added = [(a, b) for a, b in _parse_ranges(extra)
                 if unicodedata.category(chr(a)) == "Cn"]
        lines += ["};", "",
                  f"// {{first, last}}: {name[1:name.index('After')].lower()} assigned in Unicode 15.0 - 16.0 (the",
                  "// regex engine adds them to its Unicode 14 class; empty when this database has them).",
                  f"constexpr CodePointRange {name}[{max(len(added), 1)}] = {{"]
        lines += _pack([f"{{0x{a:X}, 0x{b:X}}}," for a, b in added] or ["{0x0, 0x0},"])
    lines += ["};", "", "// {first, last, canonical combining class}.",
              f"constexpr ClassRange kCombiningClassRanges[{len(ccc)}] = {{"]
    lines += _pack([f"{{0x{a:X}, 0x{b:X}, {v}}}," for a, b, v in ccc])
    lines += ["};", "", "// {code point, first, second (0: singleton)}, sorted by code point.",
              f"constexpr Decomposition kCanonicalDecompositions[{len(decomps)}] = {{"]
    lines += _pack([f"{{0x{a:X}, 0x{b:X}, 0x{c:X}}}," for a, b, c in decomps])
    lines += ["};", "", "// {first, second, composite}, sorted by (first, second).",
              f"constexpr Composition kCanonicalCompositions[{len(comps)}] = {{"]
    lines += _pack([f"{{0x{a:X}, 0x{b:X}, 0x{c:X}}}," for a, b, c in comps])
    lines += ["};", ""]
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
