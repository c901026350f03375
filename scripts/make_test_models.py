#!/usr/bin/env python3
"""Makes tiny random checkpoints of the other supported architectures, with transformers logits.

Run on a machine with torch and transformers (the GPU machine; CPU is enough):
    python3 scripts/make_test_models.py --out tests/data

Each tests/data/<name>/ holds config.json, the safetensors weights (as transformers saves them:
dtype and sharding vary on purpose) and golden.json + golden_logits.safetensors: fp32 CPU logits
of the last positions of a seeded random prompt. tests/architectures_test.cc compares the engine
against them.
"""
import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2)


def rope(cls_kwargs, theta, scaling):
    """Both transformers-5 (rope_parameters) and transformers-4 (rope_scaling) spellings."""
    params = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
    return dict(cls_kwargs, rope_parameters=params)


VARIANTS = {
    # Qwen2: q/k/v bias, YaRN scaling, untied head, fp16, sharded with an index.
    "qwen2_yarn_f16_sharded": (Qwen2Config, Qwen2ForCausalLM, torch.float16, "60KB",
                               rope(dict(COMMON, max_position_embeddings=131072,
                                         tie_word_embeddings=False, use_sliding_window=False),
                                    1000000.0, {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 32768})),
    # Mistral: linear scaling, fp32, untied, one file.
    "mistral_linear_f32": (MistralConfig, MistralForCausalLM, torch.float32, None,
                           rope(dict(COMMON, max_position_embeddings=4096, sliding_window=None,
                                     tie_word_embeddings=False, head_dim=32),
                                10000.0, {"rope_type": "linear", "factor": 2.0})),
    # Llama: plain RoPE, tied embeddings, bf16, attention bias on.
    "llama_default_bf16_bias": (LlamaConfig, LlamaForCausalLM, torch.bfloat16, None,
                                rope(dict(COMMON, max_position_embeddings=2048,
                                          tie_word_embeddings=True, attention_bias=True),
                                     10000.0, None)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data")
    args = ap.parse_args()
    for i, (name, (cfg_cls, model_cls, dtype, shard, kwargs)) in enumerate(VARIANTS.items()):
        torch.manual_seed(100 + i)
        try:
            config = cfg_cls(**kwargs)
        except TypeError:  # transformers 4 spelling
            params = kwargs.pop("rope_parameters")
            kwargs["rope_theta"] = params.pop("rope_theta")
            kwargs["rope_scaling"] = params if params.get("rope_type") != "default" else None
            config = cfg_cls(**kwargs)
        model = model_cls(config).eval()
        with torch.no_grad():  # larger weights than the default init, so layers matter
            for p in model.parameters():
                p.mul_(4.0)
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        model.to(dtype).save_pretrained(out, safe_serialization=True,
                                        **({"max_shard_size": shard} if shard else {}))
        ref = model_cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        gen = torch.Generator().manual_seed(7 + i)
        ids = torch.randint(3, config.vocab_size, (1, 40), generator=gen)
        with torch.no_grad():
            logits = ref(input_ids=ids).logits[0, -8:].contiguous()
        save_file({"logits": logits}, os.path.join(out, "golden_logits.safetensors"))
        with open(os.path.join(out, "golden.json"), "w") as f:
            json.dump({"transformers": transformers.__version__, "ids": ids[0].tolist(),
                       "last_positions": 8}, f, indent=1)
        print(name, sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
