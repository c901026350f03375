#!/usr/bin/env python3
"""Dense decode-attention baseline: PyTorch scaled_dot_product_attention, one query token per
sequence over a contiguous KV cache, on the shapes of decode_attention_bench (Llama-3.1-8B:
32 query heads, 8 KV heads, head dim 128, bf16; contexts 32K and 128K; batch 1, 8, 32).

Backends: cuDNN first, flash second. Each is tried with grouped-query attention in the call
(enable_gqa=True, K/V read once per KV head); if a backend refuses that, it is run on K/V expanded
to 32 heads (4x the bytes) and the row says so. Figures are K+V bytes of the 8-head cache over the
median time, so they compare directly with the paged kernel's; the expanded rows also give the
bytes the backend really read. Each figure is a burst of calls captured in a CUDA graph, median
over replays, divided by the burst length (the paged kernel is timed the same way). The same
run measures the two ceilings: a device-to-device copy (bytes read + written) and an 8192^3 bf16
matrix product.

usage: decode_attention_baseline.py [--json FILE] [--seed N] [--iters N]
"""
import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Q_HEADS, KV_HEADS, DIM = 32, 8, 128


def time_ms(fn, iters, warmup=5):
    """Median milliseconds of fn() over `iters` runs, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def time_burst_ms(step, reps, iters):
    """Per-call milliseconds of `step`: a burst of `reps` calls captured in a CUDA graph (so host
    launch gaps stay out), median over `iters` replays; plain back-to-back bursts if capture
    fails. Returns (ms, how)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                step()
        return time_ms(graph.replay, iters) / reps, "graph"
    except Exception as e:  # not capturable: time plain bursts
        print(f"    graph capture failed ({type(e).__name__}: {str(e)[:120]}); plain bursts",
              file=sys.stderr, flush=True)
        torch.cuda.synchronize()

        def burst():
            for _ in range(reps):
                step()
        return time_ms(burst, iters) / reps, "burst"


def ceilings(iters):
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    copy_ms = time_ms(lambda: b.copy_(a), iters)
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    gemm_ms = time_ms(lambda: x @ y, iters)
    del x, y
    torch.cuda.empty_cache()
    return 2 * n / (copy_ms * 1e-3), 2 * m**3 / (gemm_ms * 1e-3)


def run_shape(batch, context, backend, iters, gen):
    kv_bytes = 2 * batch * context * KV_HEADS * DIM * 2
    sets = max(1, math.ceil(512e6 / kv_bytes))
    inputs = []
    for _ in range(sets):
        q = torch.empty(batch, Q_HEADS, 1, DIM, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(batch, KV_HEADS, context, DIM, dtype=torch.bfloat16, device="cuda")
        v = torch.empty_like(k)
        for t in (q, k, v):
            t.uniform_(-math.sqrt(3), math.sqrt(3), generator=gen)
        inputs.append((q, k, v))
    result = {"batch": batch, "context": context, "backend": backend.name, "sets": sets,
              "kv_bytes": kv_bytes}
    modes = [("gqa", dict(enable_gqa=True))]
    expanded_bytes = kv_bytes * (Q_HEADS // KV_HEADS)
    free, _ = torch.cuda.mem_get_info()
    if expanded_bytes * sets < 0.6 * free:
        modes.append(("expanded", {}))
    for mode, kwargs in modes:
        try:
            if mode == "expanded":
                run_inputs = [(q, k.repeat_interleave(Q_HEADS // KV_HEADS, dim=1),
                               v.repeat_interleave(Q_HEADS // KV_HEADS, dim=1))
                              for q, k, v in inputs]
            else:
                run_inputs = inputs
            i = [0]

            def step():
                q, k, v = run_inputs[i[0] % sets]
                i[0] += 1
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, **kwargs)

            out = step()
            if not torch.isfinite(out).all():
                raise RuntimeError("non-finite output")
            reps = min(20, max(1, int(2e-3 / (kv_bytes / 3.0e12))))
            ms, how = time_burst_ms(step, reps, iters)
            result.update(mode=mode, ms=ms, timing=how, reps=reps,
                          tb_per_s=kv_bytes / (ms * 1e-3) / 1e12,
                          bytes_read_tb_per_s=(kv_bytes if mode == "gqa" else expanded_bytes)
                          / (ms * 1e-3) / 1e12)
            del run_inputs
            break
        except Exception as e:  # the backend refused this mode: note it and try the next
            result.setdefault("refused", []).append(f"{mode}: {type(e).__name__}: {e}"[:300])
    del inputs
    torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(args.seed)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"device {torch.cuda.get_device_name()}, seed {args.seed}", flush=True)
    copy_bw, gemm = ceilings(args.iters)
    print(f"copy {copy_bw / 1e12:.3f} TB/s (read + written), bf16 GEMM 8192^3 "
          f"{gemm / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    print("\n| backend | batch | context | mode | median us | K+V TB/s | of copy |\n"
          "|---|---|---|---|---|---|---|")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        for context in (32768, 131072):
            for batch in (1, 8, 32):
                r = run_shape(batch, context, backend, args.iters, gen)
                rows.append(r)
                if "ms" in r:
                    print(f"| {backend.name} | {batch} | {context} | {r['mode']}, {r['timing']} | "
                          f"{r['ms'] * 1e3:.1f} | {r['tb_per_s']:.3f} | "
                          f"{100 * r['tb_per_s'] * 1e12 / copy_bw:.1f}% |", flush=True)
                else:
                    print(f"| {backend.name} | {batch} | {context} | refused | - | - | - |",
                          flush=True)
                for why in r.get("refused", []):
                    print(f"    refused {why}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                       "device": torch.cuda.get_device_name(), "seed": args.seed,
                       "copy_tb_per_s": copy_bw / 1e12, "gemm_tflops": gemm / 1e12,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
