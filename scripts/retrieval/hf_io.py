"""Hugging Face Llama checkpoint I/O without the safetensors or transformers packages.

safetensors layout: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, padded with
spaces to a multiple of 8), then the raw little-endian tensor bytes, offsets relative to the
end of the header.
"""
import json
import os
import shutil
import struct

import numpy as np
import torch

from model import LlamaForCausalLM, LlamaShape

_DTYPES = {  # torch dtype -> (safetensors name, numpy dtype of the raw bytes)
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.bfloat16: ("BF16", np.int16),  # numpy has no bfloat16: move the raw 16-bit words
}
_BY_NAME = {name: (dt, npdt) for dt, (name, npdt) in _DTYPES.items()}


def _raw_bytes(t):
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: tensor} to `path` atomically (temporary file, then rename)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}")
        blob = _raw_bytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype][0], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def read_safetensors(path):
    """Returns ({name: tensor}, metadata dict); checks that offsets tile the data exactly."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {})
    body = data[8 + n:]
    tensors, spans = {}, []
    for name, info in header.items():
        dtype, npdt = _BY_NAME[info["dtype"]]
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if end - begin != count * np.dtype(npdt).itemsize:
            raise ValueError(f"{path}: {name} has {end - begin} bytes for shape {info['shape']}")
        arr = np.frombuffer(body, dtype=np.dtype(npdt).newbyteorder("<"), count=count,
                            offset=begin).astype(npdt)
        t = torch.from_numpy(arr.copy()).view(dtype) if dtype == torch.bfloat16 else \
            torch.from_numpy(arr.copy())
        tensors[name] = t.reshape(info["shape"])
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise ValueError(f"{path}: tensor data is not contiguous at byte {begin}")
        pos = end
    if pos != len(body):
        raise ValueError(f"{path}: {len(body) - pos} trailing bytes")
    return tensors, metadata


def hf_config(shape, dtype_name):
    """config.json contents, with the keys models/embedded/config.json has."""
    rope = dict(shape.rope_scaling or {"rope_type": "default"}, rope_theta=shape.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": shape.bos_token_id,
        "dtype": dtype_name,
        "eos_token_id": shape.eos_token_id,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def shape_from_config(cfg):
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    return LlamaShape(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        head_dim=cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]),
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
        rope_scaling=rope or None, tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))


def state_for_saving(model, dtype):
    """HF-named tensors in `dtype`; lm_head is dropped when tied (as transformers saves)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.shape.tie_word_embeddings:
            continue
        out[name] = t.detach().to("cpu", dtype).contiguous()
    return out


def save_checkpoint(model, out_dir, dtype=torch.bfloat16, metadata=None):
    """Writes config.json and model.safetensors (atomically) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    name = _DTYPES[dtype][0]
    dtype_name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[name]
    write_json(os.path.join(out_dir, "config.json"), hf_config(model.shape, dtype_name))
    write_safetensors(os.path.join(out_dir, "model.safetensors"), state_for_saving(model, dtype),
                      dict({"format": "pt"}, **(metadata or {})))


def load_checkpoint(out_dir):
    """(model in float32 on the CPU, its tensors as stored) from a saved directory."""
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    model = LlamaForCausalLM(shape_from_config(cfg))
    tensors, _ = read_safetensors(os.path.join(out_dir, "model.safetensors"))
    expected = set(state_for_saving(model, torch.float32))
    if set(tensors) != expected:
        raise ValueError(f"tensor names differ: missing {sorted(expected - set(tensors))[:5]}, "
                         f"extra {sorted(set(tensors) - expected)[:5]}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()},
                          strict=not model.shape.tie_word_embeddings)
    return model.eval(), tensors


def copy_tokenizer_files(src_dir, out_dir):
    """Copies tokenizer.json, tokenizer_config.json and generation_config.json where present."""
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
