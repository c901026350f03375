#!/usr/bin/env python3
"""Logits of the embedded model's golden prompts from Hugging Face transformers in bf16 on the GPU.

The CUDA backend's GPU test (engine/backends/cuda/cuda_backend_gpu_test.cc, LogitsMatchTransformersBf16)
compares its logits with these when SIEVE_HF_BF16_LOGITS names the output file. The file holds,
for each entry of golden.json's "logits", a float32 tensor [last_positions, vocab] named like the
entry (prompt0, prompt1, ...), exactly as golden_logits.safetensors (made in fp32 on the CPU) does.

Also printed, for context: how far transformers bf16 itself is from the fp32 goldens (relative L2
per position), and where its greedy continuations leave the fp32 ones, with the top-2 margin.

  python3 scripts/transformers_bf16_logits.py --out hf_bf16_logits.safetensors
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM


def rel_l2(got, want):
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "models", "embedded"))
    ap.add_argument("--out", required=True, help="safetensors file to write")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa or eager)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with open(os.path.join(args.model, "golden.json"), encoding="utf-8") as f:
        golden = json.load(f)
    fp32 = load_file(os.path.join(args.model, "golden_logits.safetensors"))
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16,
                                             attn_implementation=args.attn).to(device).eval()
    print(f"transformers bf16 on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, attn {args.attn}")

    out = {}
    with torch.no_grad():
        for entry in golden["logits"]:
            ids = torch.tensor([entry["ids"]], device=device)
            k = entry["last_positions"]
            logits = model(input_ids=ids).logits[0, -k:].float().cpu().contiguous()
            out[entry["name"]] = logits
            errs = [rel_l2(logits[p], fp32[entry["name"]][p]) for p in range(k)]
            print(f"{entry['name']}: {len(entry['ids'])} tokens, rel L2 vs fp32 golden: "
                  f"max {max(errs):.3e} mean {sum(errs) / len(errs):.3e}")

        for i, entry in enumerate(golden["greedy"]):
            ids = list(entry["prompt_ids"])
            want = entry["output_ids"]
            diverged = None
            min_margin = float("inf")
            for step, tok in enumerate(want):
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
                top2 = torch.topk(logits, 2)
                margin = float(top2.values[0] - top2.values[1])
                min_margin = min(min_margin, margin)
                if diverged is None and int(top2.indices[0]) != tok:
                    diverged = (step, int(top2.indices[0]), tok, margin)
                ids.append(tok)  # teacher-forced, as the C++ test does
            if diverged is None:
                print(f"greedy prompt {i}: bf16 agrees with fp32 for all {len(want)} tokens "
                      f"(smallest top-2 margin {min_margin:.4f})")
            else:
                step, got, tok, margin = diverged
                print(f"greedy prompt {i}: bf16 first differs at token {step}: {got} vs {tok} "
                      f"(top-2 margin {margin:.4f})")

    save_file(out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
