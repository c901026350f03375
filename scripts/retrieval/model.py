"""A small Llama in plain PyTorch (runs on torch 1.13 and 2.x), matching Hugging Face's math.

Parameter names are Hugging Face's LlamaForCausalLM names, and weights are stored in its
layout: q_proj/k_proj rows are in the order HF uses with its rotate_half RoPE (the first half
of each head's dimensions pairs with the second half), so `state_dict()` saves as-is.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaShape:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # llama3 RoPE scaling, as in models/embedded/config.json.
    rope_scaling: dict = field(default_factory=lambda: {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1


def rope_inv_freq(shape):
    """Inverse frequencies [head_dim / 2] (float32), with llama3 scaling when configured.

    Plain RoPE: inv_freq[i] = theta^(-2i/d). llama3 scaling keeps high frequencies (wavelength
    below original_max / high_freq_factor), divides low frequencies (wavelength above
    original_max / low_freq_factor) by `factor`, and interpolates linearly in between with
    smooth = (original_max / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor):
    inv = (1 - smooth) * inv / factor + smooth * inv.
    """
    d = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = shape.rope_scaling or {}
    if s.get("rope_type", "default") == "default":
        return inv
    if s["rope_type"] != "llama3":
        raise ValueError(f"unsupported rope_type {s['rope_type']}")
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq, positions):
    """cos, sin [T, head_dim] (float32) for integer positions [T]."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    """HF's rotate_half RoPE, in float32, result in x's dtype (bf16 under autocast)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def causal_attention(q, k, v):
    """q [B, H, T, D], k/v [B, H, T, D] -> [B, H, T, D], causal, scale 1/sqrt(D)."""
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # torch < 2.0 fallback (CPU smoke runs): explicit masked softmax.
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.float().masked_fill(mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype)) @ v


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.h, self.kv, self.d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, s.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)   # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: query head i reads KV head i // (H / KV), as HF's repeat_kv does.
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        out = causal_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `model.` submodule: embeddings, layers, final norm."""

    def __init__(self, s):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(s) for _ in range(s.num_hidden_layers)])
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, shape, checkpoint_layers=False):
        super().__init__()
        self.shape = shape
        self.model = Backbone(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(shape), persistent=False)
        self.checkpoint_layers = checkpoint_layers
        self._init_weights()

    def _init_weights(self, std=0.02):
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # Residual-branch outputs start smaller (GPT-2 style), for stable deep sums.
                scale = 1 / math.sqrt(2 * self.shape.num_hidden_layers) if name.endswith(
                    ("o_proj.weight", "down_proj.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)

    def hidden_states(self, ids):
        """ids [B, T] -> final normed hidden states [B, T, hidden]."""
        x = self.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        for layer in self.model.layers:
            if self.checkpoint_layers and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward(self, ids):
        """Full logits [B, T, vocab] (small inputs only: tests and checks)."""
        return self.lm_head(self.hidden_states(ids)).float()


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())
