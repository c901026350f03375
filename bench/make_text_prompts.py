#!/usr/bin/env python3
"""Long prompts of real text for end-to-end timing on the embedded model (bench/run_cpu_gates.sh).

The embedded model was trained on this repository's C++ (models/embedded/CORPUS.txt), so its
attention over the repository's own sources is what a user's long prompt gives it: the text is
every engine/*/*.cc and server/*.cc file in sorted order, tokenized by a running sieved with the
model's tokenizer (`sieve tokenize`), BOS first. Writes one JSON line per length with "ids" (the
first LENGTH tokens) and "answer_ids" (the next --answer tokens), the format
bench/retrieval_fidelity reads; its accuracy column is then next-token agreement with the text,
not retrieval.

  bench/make_text_prompts.py --sieve build/cli/sieve --target localhost:PORT \\
      --lengths 16384,32768 --out DIR
"""
import argparse
import glob
import json
import os
import subprocess


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sieve", default="build/cli/sieve")
    ap.add_argument("--target", required=True)
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    need = max(lengths) + a.answer
    ids = [0]  # BOS of the embedded model
    files = sorted(glob.glob("engine/*/*.cc")) + sorted(glob.glob("server/*.cc"))
    for f in files:
        with open(f, encoding="utf-8") as fh:
            text = fh.read()
        if len(text) > 120000:  # one argument must stay under the kernel's 128 KiB limit
            continue
        out = subprocess.run([a.sieve, "tokenize", "--target", a.target, "--no-bos", text],
                             capture_output=True, text=True, check=True)
        ids += [int(x) for x in out.stdout.split()]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} tokens of text, {need} needed")
    os.makedirs(a.out, exist_ok=True)
    for n in lengths:
        path = os.path.join(a.out, f"text_{n}.jsonl")
        with open(path, "w") as fh:
            fh.write(json.dumps({"ids": ids[:n], "answer_ids": ids[n:n + a.answer],
                                 "length": n}) + "\n")
        print(path)


if __name__ == "__main__":
    main()
