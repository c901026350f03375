#!/usr/bin/env python3
"""Writes a Llama-family Hugging Face folder (config.json, model.safetensors, tokenizer.json with
a byte-level BPE model) as an F32 GGUF for llama.cpp, with llama.cpp's own gguf-py
(GGUFWriter, the tensor name map) and numpy only: no torch, no transformers.

    PYTHONPATH=LLAMA_CPP/gguf-py python3 bench/llamacpp/to_gguf.py models/embedded OUT.gguf

What llama.cpp's converter does for this architecture and this script repeats: query and key
projection rows are reordered from Hugging Face's rotate-half RoPE layout to GGUF's interleaved
pairs (per head, row i of the first half and row i of the second half become rows 2i and
2i + 1); Llama 3 RoPE scaling becomes a `rope_freqs` tensor of per-frequency divisors; tied
embeddings write no output matrix (llama.cpp then uses token_embd); the vocabulary is the BPE
model's plus its added tokens, special ones typed CONTROL.
"""
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import gguf


def read_safetensors(path):
    """Yields (name, float32 array) for every tensor of a safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            raw = f.read(end - begin)
            dtype = info["dtype"]
            if dtype == "BF16":
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                arr = bits.view(np.float32)
            elif dtype == "F16":
                arr = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
            elif dtype == "F32":
                arr = np.frombuffer(raw, dtype=np.float32).copy()
            else:
                raise SystemExit(f"{path}: tensor {name} has unsupported dtype {dtype}")
            yield name, arr.reshape(info["shape"])


def interleave_rope_rows(w, heads):
    """Rotate-half row order (per head: first halves, then second halves) to interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_divisors(rope, head_dim):
    """Per-frequency divisors of Llama 3 RoPE scaling (Meta's formula; llama.cpp's rope_freqs)."""
    base = rope["rope_theta"]
    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: to_gguf.py MODEL_DIR OUT.gguf")
    src, out = Path(sys.argv[1]), sys.argv[2]
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"{src}: model_type {cfg.get('model_type')!r}, this script writes llama")
    n_layers = cfg["num_hidden_layers"]
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // n_head)
    rope = cfg.get("rope_parameters") or dict(cfg.get("rope_scaling") or {}, rope_theta=cfg.get("rope_theta", 10000.0))

    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(src.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    # Vocabulary: byte-level BPE (llama.cpp's "gpt2" tokenizer model, Llama 3's pre-tokenizer).
    tok = json.loads((src / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise SystemExit(f"{src}/tokenizer.json: model type {tok['model']['type']}, need BPE")
    tokens = [None] * cfg["vocab_size"]
    types = [gguf.TokenType.NORMAL] * cfg["vocab_size"]
    for text, i in tok["model"]["vocab"].items():
        tokens[i] = text
    for a in tok["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id)):
        if tcfg.get(key) in ids:
            add(ids[tcfg[key]])
    w.add_add_bos_token(tok.get("post_processor") is not None)

    # Tensors.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    if rope.get("rope_type") == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                     llama3_rope_divisors(rope, head_dim))
    for name, arr in read_safetensors(src / "model.safetensors"):
        if name.endswith("q_proj.weight"):
            arr = interleave_rope_rows(arr, n_head)
        elif name.endswith("k_proj.weight"):
            arr = interleave_rope_rows(arr, n_kv)
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SystemExit(f"{src}: no GGUF name for tensor {name}")
        w.add_tensor(new, np.ascontiguousarray(arr, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
