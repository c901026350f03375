#!/usr/bin/env python3
"""Writes one retrieval prompt of an exact token length, and its expected answer.

    /usr/bin/python3 scripts/retrieval/make_prompt.py --length 32768 --out /tmp/p32k.txt
    # /tmp/p32k.txt: the prompt text (no BOS, no trailing newline), ending "... is"
    # /tmp/p32k.json: {"length", "ids" (BOS first), "answer_text" (e.g. " 5121"),
    #                  "answer_ids", "key", "value", "needle_position", "seed"}

`length` counts tokens including the BOS the tokenizer template adds, so encoding the text
with the model's tokenizer (BOS added) gives exactly `ids`. The expected greedy continuation
is `answer_text` (answer_ids; a space token, then the digits). Needs only torch (any version).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bpe import ByteBPE, load_reference_tokenizer  # noqa: E402
from retrieval_data import RetrievalTask  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, required=True, help="prompt tokens, BOS included")
    ap.add_argument("--out", default=None,
                    help="text file to write (default: text to stdout, JSON to stderr)")
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "models", "embedded",
                                                        "tokenizer.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--facts", type=int, default=None,
                    help="facts in the prompt (default: as in training, up to 32)")
    ap.add_argument("--value-tokens", type=int, default=2,
                    help="must match the model's training (train_retrieval_model.py)")
    args = ap.parse_args()

    task = RetrievalTask(ByteBPE(args.tokenizer), value_tokens=args.value_tokens)
    gen = torch.Generator().manual_seed(args.seed)
    p = task.prompt(args.length, gen, n_facts=args.facts)
    ref = load_reference_tokenizer(args.tokenizer)
    if ref is not None and ref.encode(p["text"]).ids != p["ids"]:
        sys.exit("tokenizers encodes the prompt differently from the generator")
    meta = {k: p[k] for k in ("length", "answer_text", "answer_ids", "key", "value",
                              "needle_position")}
    meta["seed"] = args.seed
    if args.out is None:
        sys.stdout.write(p["text"])
        sys.stderr.write(json.dumps(meta) + "\n")
        return
    with open(args.out, "w") as f:
        f.write(p["text"])
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(meta, ids=p["ids"]), f)
        f.write("\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
