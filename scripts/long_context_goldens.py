#!/usr/bin/env python3
"""Long-context goldens for the embedded model: transformers' fp32 logits at 8K and 32K positions.

Writes models/embedded/golden_long.json (the prompts' token ids and the positions checked) and
models/embedded/golden_long_logits.safetensors (one float32 tensor [positions, vocab] per prompt),
which tests/golden_test.cc (GoldenLongTest) compares with the CPU backend's logits.

Each prompt is the embedded model's tokenizer applied to text drawn from this repository's
documentation (docs/*.md, README.md, the folder READMEs), sorted by path and repeated until the
prompt is long enough, then cut to exactly N tokens (BOS first). The ids are stored, so the test
does not tokenize and later edits to the documents do not change the goldens.

Run where transformers is installed (the GPU machine has it; it also runs on a CPU, slowly):
    python3 scripts/long_context_goldens.py [--lengths 8192,32768] [--device cuda|cpu]
Attention is computed by PyTorch's SDPA in float32 with TF32 off on every path (a float32
reference: the test's tolerance is for float32 arithmetic on both sides).
"""
import argparse
import glob
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM
import transformers

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def positions_for(n):
    """Positions whose logits are kept: powers of two from 1024 below n, and the last 8."""
    pos = []
    p = 1024
    while p < n - 8:
        pos.append(p - 1)
        p *= 2
    pos += list(range(n - 8, n))
    return pos


def corpus_text():
    files = sorted(set(glob.glob(os.path.join(REPO, "docs", "*.md")) +
                       glob.glob(os.path.join(REPO, "*", "README.md")) +
                       glob.glob(os.path.join(REPO, "*", "*", "README.md")) +
                       [os.path.join(REPO, "README.md")]))
    return "\n\n".join(open(f, encoding="utf-8").read() for f in files), len(files)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "models", "embedded"))
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", default=None, help="default: --model")
    args = ap.parse_args()
    out_dir = args.out_dir or args.model
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    tok = AutoTokenizer.from_pretrained(args.model)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                             attn_implementation="sdpa").to(args.device).eval()
    text, nfiles = corpus_text()
    ids_all = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    golden = {"transformers": transformers.__version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "dtype": "float32 (bf16 weights upcast), SDPA, TF32 off",
              "source": f"{nfiles} documentation files of the repository, sorted, repeated",
              "prompts": []}
    tensors = {}
    with torch.no_grad():
        for n in (int(x) for x in args.lengths.split(",")):
            reps = (n // max(1, len(ids_all))) + 1
            ids = ([bos] + ids_all * reps)[:n]
            pos = positions_for(n)
            x = torch.tensor([ids], device=args.device)
            out = model.model(input_ids=x).last_hidden_state[0]  # [n, hidden]
            logits = model.lm_head(out[pos]).float().cpu().contiguous()
            name = f"long{n}"
            tensors[name] = logits
            golden["prompts"].append({"name": name, "ids": ids, "positions": pos})
            top = logits.argmax(-1).tolist()
            print(f"{name}: {n} tokens, {len(pos)} positions, argmax at the last: {top[-1]}")
    save_file(tensors, os.path.join(out_dir, "golden_long_logits.safetensors"))
    with open(os.path.join(out_dir, "golden_long.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, separators=(",", ":"))
    print(f"wrote {out_dir}/golden_long.json and golden_long_logits.safetensors")


if __name__ == "__main__":
    main()
