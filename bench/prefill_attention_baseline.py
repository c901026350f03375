#!/usr/bin/env python3
"""Dense prefill-attention baseline: PyTorch scaled_dot_product_attention, causal, on the shapes of
prefill_attention_bench (batch 1, 32 query heads, 8 KV heads, head dim 128, bf16, N = 8K, 32K,
128K), with the cuDNN backend and the flash backend, plus the two ceilings of BENCHMARKS.md
(a device-to-device copy and an 8192^3 bf16 matrix product) measured in the same run.

Each backend is first called with grouped-query attention (enable_gqa=True); if it refuses, K and V
are expanded to 32 heads and the row says so. FLOPs = 4 * N^2 * d * Hq / 2. Each figure is the
median of at least 10 timed calls (5 when a call takes over 100 ms) after warm-up, each timed with
CUDA events. Inputs are seeded random normal bf16.

usage: prefill_attention_baseline.py [--json FILE] [--seed N] [--max-n N] [--ns N,N,...]
                                    [--backends cudnn,flash]
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Q_HEADS, KV_HEADS, DIM = 32, 8, 128


def time_ms(fn, min_iters=10, warmup=2):
    """Median milliseconds of fn(): at least min_iters calls, or 5 when one takes over 100 ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    while True:
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if len(times) >= min_iters or (len(times) >= 5 and statistics.mean(times) > 100.0):
            break
    return statistics.median(times), len(times)


def ceilings():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = time_ms(lambda: a @ b)
    gemm = 2 * n**3 / (ms * 1e-3) / 1e12
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src))
    copy = 2 * src.numel() * 4 / (ms * 1e-3) / 1e12
    del a, b, src, dst
    return gemm, copy


def run_backend(backend, q, k, v):
    """Returns (ms, iters, note) of causal SDPA under `backend`, or raises if it cannot run."""
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        note = "gqa"
    except RuntimeError:
        group = Q_HEADS // KV_HEADS
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        note = "kv expanded to 32 heads"
    with sdpa_kernel(backend):
        ms, iters = time_ms(fn)
    return ms, iters, note


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--max-n", type=int, default=131072)
    parser.add_argument("--ns", default="8192,32768,131072",
                        help="comma-separated lengths (those above --max-n are skipped)")
    parser.add_argument("--backends", default="cudnn,flash", help="comma-separated: cudnn, flash")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"device {torch.cuda.get_device_name()}, seed {args.seed}")
    gemm, copy = ceilings()
    print(f"ceilings: bf16 GEMM 8192^3 {gemm:.1f} TFLOP/s; device copy {copy:.2f} TB/s")
    rows = []
    print(f"{'N':>7} {'backend':>8} {'iters':>5} {'median_ms':>10} {'TFLOP/s':>8}  note")
    wanted = set(args.backends.split(","))
    for n in (int(x) for x in args.ns.split(",")):
        if n > args.max_n:
            continue
        q = torch.randn(1, Q_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        flops = 4.0 * n * n * DIM * Q_HEADS / 2
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("flash", SDPBackend.FLASH_ATTENTION)):
            if name not in wanted:
                continue
            try:
                ms, iters, note = run_backend(backend, q, k, v)
                tflops = flops / (ms * 1e-3) / 1e12
                print(f"{n:>7} {name:>8} {iters:>5} {ms:>10.3f} {tflops:>8.1f}  {note}")
                rows.append(dict(n=n, backend=name, iters=iters, median_ms=ms, tflops=tflops,
                                 note=note))
            except RuntimeError as e:
                print(f"{n:>7} {name:>8} failed: {str(e).splitlines()[0]}")
                rows.append(dict(n=n, backend=name, error=str(e).splitlines()[0]))
            sys.stdout.flush()
            torch.cuda.empty_cache()
        del q, k, v
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gemm_tflops=gemm, copy_tbps=copy, rows=rows, seed=args.seed,
                           torch=torch.__version__, device=torch.cuda.get_device_name()), f,
                      indent=1)


if __name__ == "__main__":
    main()
