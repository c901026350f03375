#!/usr/bin/env python3
"""Writes a set of retrieval prompts as JSON lines, for bench/retrieval_fidelity.

    /usr/bin/python3 scripts/retrieval/make_prompt_set.py --lengths 8192,32768,131072 \
        --count 32,16,8 --out /tmp/prompts.jsonl

One line per prompt: {"length", "ids" (BOS first), "answer_ids", "answer_text", "key",
"value", "needle_position", "seed"}. Prompt i of a length uses seed `--seed + i`, and lengths
are offset by 1,000,000 seeds, so sets of different sizes share their first prompts. The
needle depths are uniform over the prompt (as in training). Needs only torch (any version).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bpe import ByteBPE  # noqa: E402
from retrieval_data import RetrievalTask  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", required=True, help="prompt tokens (BOS included), comma list")
    ap.add_argument("--count", required=True, help="prompts per length: one number or a list")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "models", "embedded",
                                                        "tokenizer.json"))
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--model", default=None,
                    help="a trained model's folder: its retrieval_task.json sets the task flags")
    ap.add_argument("--value-tokens", type=int, default=2,
                    help="must match the model's training (train_retrieval_model.py)")
    ap.add_argument("--max-key-tokens", type=int, default=3)
    ap.add_argument("--key-source", choices=["lists", "vocab"], default="lists")
    ap.add_argument("--value-source", choices=["digits", "words"], default="digits")
    args = ap.parse_args()
    if args.model:
        with open(os.path.join(args.model, "retrieval_task.json")) as f:
            for k, v in json.load(f).items():
                setattr(args, k, v)
    lengths = [int(x) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.count.split(",")]
    if len(counts) == 1:
        counts *= len(lengths)
    if len(counts) != len(lengths) or min(lengths) < 64 or min(counts) < 1:
        ap.error("--count must be one number or one per length; lengths >= 64")
    task = RetrievalTask(ByteBPE(args.tokenizer), value_tokens=args.value_tokens,
                         max_key_tokens=args.max_key_tokens, key_source=args.key_source,
                         value_source=args.value_source)
    with open(args.out, "w") as f:
        for li, (length, count) in enumerate(zip(lengths, counts)):
            for i in range(count):
                seed = args.seed + li * 1_000_000 + i
                p = task.prompt(length, torch.Generator().manual_seed(seed))
                rec = {k: p[k] for k in ("length", "ids", "answer_ids", "answer_text", "key",
                                         "value", "needle_position")}
                rec["seed"] = seed
                f.write(json.dumps(rec) + "\n")
            print(f"{count} prompts of {length} tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
