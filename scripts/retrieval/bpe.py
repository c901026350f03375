"""A small pure-Python byte-level BPE encoder over a Hugging Face `tokenizer.json`.

Written so that the retrieval data generator needs neither `tokenizers` nor `regex`. It covers
what the embedded tokenizer uses: the Llama-3 split regex followed by the GPT-2 byte-to-unicode
map, a BPE model (optionally with `ignore_merges`), and a BOS template. The pre-tokenizer here
is exact only for ASCII text: \\p{L} is taken as [A-Za-z] and \\p{N} as [0-9]. The generator
only produces ASCII, and `check_against_tokenizers()` compares against the real library
wherever it is installed.
"""
import json
import re

# The Llama-3 split regex with \p{L} -> [A-Za-z] and \p{N} -> [0-9] (exact for ASCII input).
_ASCII_LLAMA3_SPLIT = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}|"
    r" ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to
    code points 256, 257, ... (so the space byte 0x20 becomes 'Ġ', U+0120).
    """
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteBPE:
    """Encodes ASCII text into token ids the way `tokenizer.json` would (see module doc)."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')} is not BPE")
        self.vocab = dict(model["vocab"])
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.ranks = {}
        for rank, merge in enumerate(model["merges"]):
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            self.ranks[(a, b)] = rank
        self.special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({i: t for t, i in self.special.items()})
        self.byte_map = bytes_to_unicode()
        self.unicode_to_byte = {c: b for b, c in self.byte_map.items()}
        self.bos_id = self.special.get("<|begin_of_text|>")
        self.eos_id = self.special.get("<|end_of_text|>")
        self._cache = {}

    @property
    def vocab_size(self):
        return max(self.id_to_token) + 1

    def encode_pretoken(self, piece):
        """Token ids of one pre-token (a string the split regex yields as a single match)."""
        if piece in self._cache:
            return self._cache[piece]
        symbols = [self.byte_map[b] for b in piece.encode("utf-8")]
        whole = "".join(symbols)
        if self.ignore_merges and whole in self.vocab:
            ids = [self.vocab[whole]]
        else:
            # Classic BPE: repeatedly merge the adjacent pair of lowest merge rank (leftmost
            # first on ties of the same pair), until no adjacent pair is a known merge.
            while len(symbols) > 1:
                best, best_rank = None, None
                for i in range(len(symbols) - 1):
                    rank = self.ranks.get((symbols[i], symbols[i + 1]))
                    if rank is not None and (best_rank is None or rank < best_rank):
                        best, best_rank = i, rank
                if best is None:
                    break
                symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
            ids = [self.vocab[s] for s in symbols]
        self._cache[piece] = ids
        return ids

    @staticmethod
    def pretokenize(text):
        """Splits ASCII text into pre-tokens (Llama-3 regex semantics)."""
        if not text.isascii():
            raise ValueError("the pure-Python pre-tokenizer handles ASCII text only")
        return _ASCII_LLAMA3_SPLIT.findall(text)

    def encode(self, text, add_bos=True):
        ids = [self.bos_id] if add_bos else []
        for piece in self.pretokenize(text):
            ids += self.encode_pretoken(piece)
        return ids

    def decode(self, ids, skip_special=True):
        out = bytearray()
        for i in ids:
            tok = self.id_to_token[int(i)]
            if tok in self.special:
                if not skip_special:
                    out += tok.encode("utf-8")
                continue
            out += bytes(self.unicode_to_byte[c] for c in tok)
        return out.decode("utf-8", errors="replace")


def load_reference_tokenizer(path):
    """The `tokenizers` library's Tokenizer for `path`, or None where it is not installed."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(path)


def check_against_tokenizers(path, texts, expected_ids):
    """Compares `expected_ids[i]` with the real library's encoding of `texts[i]` (BOS added).

    Returns (checked: bool, mismatches: list of indices). `checked` is False where the
    `tokenizers` library is absent.
    """
    ref = load_reference_tokenizer(path)
    if ref is None:
        return False, []
    bad = []
    for i, (text, ids) in enumerate(zip(texts, expected_ids)):
        if ref.encode(text, add_special_tokens=True).ids != list(ids):
            bad.append(i)
    return True, bad
