#!/usr/bin/env python3
"""transformers baseline for bench/model_bench.cc: the same model shape with random bf16 weights,
SDPA attention, on the GPU. Prefill = time to first token of one sequence (logits of the last
position only); decode = median time of one single-token step over a KV cache of C tokens.

    python3 bench/model_baseline.py --config configs/models/llama-3.1-8b/config.json \
        --prefill 8192,32768 --decode 1:32768
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--prefill", default="8192")
    ap.add_argument("--decode", default="")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    config = AutoConfig.from_pretrained(args.config.rsplit("/", 1)[0])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    vocab = config.vocab_size
    print("\n| phase | tokens | batch | transformers time | rate |\n|---|---|---|---|---|")
    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, 512), device="cuda")
        model(ids, logits_to_keep=1)  # warm-up
        for n in [int(x) for x in args.prefill.split(",") if x]:
            ids = torch.randint(0, vocab, (1, n), device="cuda")
            best = min(sync_time(lambda: model(ids, logits_to_keep=1))[0] for _ in range(2))
            print(f"| prefill | {n} | 1 | {best:.3f} s | {n / best:.0f} tok/s |", flush=True)
        for spec in [x for x in args.decode.split(",") if x]:
            b, c = (int(v) for v in spec.split(":"))
            ids = torch.randint(0, vocab, (b, c), device="cuda")
            out = model(ids, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            nxt = torch.randint(0, vocab, (b, 1), device="cuda")
            times = []
            for i in range(args.steps + 3):
                # Re-use the same prefix: crop the cache back to c tokens each step.
                cache.crop(c)
                dt, _ = sync_time(lambda: model(nxt, past_key_values=cache, use_cache=True))
                if i >= 3:
                    times.append(dt)
            times.sort()
            med = times[len(times) // 2]
            print(f"| decode step | context {c} | {b} | {med * 1e3:.2f} ms | {b / med:.0f} tok/s |",
                  flush=True)
            del cache, out
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
