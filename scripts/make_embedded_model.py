#!/usr/bin/env python3
"""Makes Sieve's embedded default model and the golden outputs it is tested against.

Run on a machine with torch, transformers and tokenizers (the GPU machine):
    python3 scripts/make_embedded_model.py --out models/embedded

1. Trains a byte-level BPE tokenizer (Llama-3 pre-tokenizer regex, BOS template) on text that
   this repository owns: its Markdown, source, config and script files.
2. Initialises a small LlamaForCausalLM from a fixed seed (4 layers, hidden 256, 4 heads of 64,
   2 KV heads, max positions 131072, rope_theta 500000 with llama3 scaling) and trains it for a
   few hundred steps on the same text, so that its continuations look like text; saves bf16.
3. Writes golden outputs computed by transformers on the CPU in float32 (weights upcast from
   bf16, eager attention): token ids of tricky strings, logits of several prompts, and greedy
   continuations.
"""
import argparse
import glob
import json
import math
import os
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from safetensors.torch import save_file

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
CORPUS_GLOBS = ["**/*.md", "**/*.h", "**/*.cc", "**/*.cu", "**/*.py", "**/*.sh",
                "**/*.yaml", "**/*.proto", "**/*.txt"]

TRICKY = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000",
    "Contractions: I'm you're he's we'll they'd can't WON'T It'S",
    "Unicode: naïve café résumé Ünïcödé ñ ß Ω ∑ ∫ √",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "CJK: 日本語のテキスト 中文文本 한국어 텍스트",
    "Combining: e\u0301 a\u0308 n\u0303",
    "<|begin_of_text|>special tokens<|end_of_text|> inside <|eot_id|>text",
    "code: for (int i = 0; i < n; ++i) { x[i] += y[i] * 2; }",
    "    indented\n        more indented\n",
    "punctuation!!! ??? ... --- ((())) \"quotes\" 'single'",
    "mixed123abc456 x1y2z3 __init__ snake_case CamelCase",
    "",
    " ",
    "\n",
    "a",
    "Arabic: مرحبا بالعالم Hebrew: שלום עולם Hindi: नमस्ते दुनिया",
    "Zero-width\u200bspace and\u00a0nbsp and \u3000 ideographic space",
]

PROMPTS = [
    "Sieve is a long-context LLM serving daemon",
    "The scheduler admits waiting requests when",
    "// Returns the number of pages",
]


def read_corpus(root):
    texts, files = [], []
    for pattern in CORPUS_GLOBS:
        for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
            rel = os.path.relpath(path, root)
            if rel.startswith(("build", "models/", ".")) or "/build" in rel:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    texts.append(f.read())
                files.append(rel)
            except (UnicodeDecodeError, OSError):
                pass
    return texts, files


# A Llama-3-style chat template over the embedded tokenizer's own special tokens (Sieve renders it
# for GenerateRequest.messages; see docs/chat.md).
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")


def add_chat_template(out_dir):
    """Stores CHAT_TEMPLATE in tokenizer_config.json (not in a chat_template.jinja file)."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["chat_template"] = CHAT_TEMPLATE
    with open(path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    jinja_file = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja_file):
        os.remove(jinja_file)


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    return tok


def make_config(vocab_size, bos, eos):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    common = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
                  hidden_act="silu", attention_bias=False, mlp_bias=False)
    try:
        return LlamaConfig(rope_parameters=dict(rope, rope_theta=500000.0), **common)
    except TypeError:
        return LlamaConfig(rope_theta=500000.0, rope_scaling=rope, **common)


def train_model(model, ids, steps, seq, batch, seconds):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    data = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1234)
    start = time.time()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq] for s in starts]).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.1f} s)", flush=True)
        if time.time() - start > seconds:
            print(f"stopping at step {step}: time limit", flush=True)
            break
    return model.cpu().eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/embedded")
    ap.add_argument("--root", default=".")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train-seconds", type=float, default=120)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    texts, files = read_corpus(args.root)
    print(f"corpus: {len(files)} files, {sum(map(len, texts))} chars")
    tok = train_tokenizer(texts, args.vocab)
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|pad|>")
    fast.save_pretrained(args.out)
    add_chat_template(args.out)
    hf_tok = AutoTokenizer.from_pretrained(args.out)

    config = make_config(tok.get_vocab_size(), bos, eos)
    model = LlamaForCausalLM(config)
    ids = []
    for t in texts:
        ids += [bos] + tok.encode(t, add_special_tokens=False).ids + [eos]
    print(f"training tokens: {len(ids)}")
    model = train_model(model, ids, args.steps, seq=256, batch=32, seconds=args.train_seconds)
    model = model.to(torch.bfloat16)
    model.save_pretrained(args.out, safe_serialization=True)

    # Goldens: transformers on the CPU in float32 with the saved (bf16) weights upcast.
    ref = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    golden = {"transformers": transformers.__version__, "torch": torch.__version__,
              "corpus_files": len(files), "tokenizer": [], "logits": [], "greedy": []}
    for s in TRICKY:
        golden["tokenizer"].append({
            "text": s,
            "ids": hf_tok(s, add_special_tokens=True)["input_ids"],
            "ids_no_special": hf_tok(s, add_special_tokens=False)["input_ids"],
            "decoded": hf_tok.decode(hf_tok(s, add_special_tokens=False)["input_ids"]),
        })
    long_prompt = texts[0][:3000]
    tensors = {}
    with torch.no_grad():
        for i, p in enumerate(PROMPTS + [long_prompt]):
            enc = hf_tok(p, return_tensors="pt")
            logits = ref(**enc).logits[0]  # [T, V]
            keep = min(16, logits.shape[0])
            name = f"prompt{i}"
            tensors[name] = logits[-keep:].contiguous().float()
            golden["logits"].append({"name": name, "text": p, "ids": enc["input_ids"][0].tolist(),
                                     "last_positions": keep})
        for p in PROMPTS:
            enc = hf_tok(p, return_tensors="pt")
            out = ref.generate(**enc, max_new_tokens=32, do_sample=False,
                               pad_token_id=eos)
            golden["greedy"].append({"text": p, "prompt_ids": enc["input_ids"][0].tolist(),
                                     "output_ids": out[0, enc["input_ids"].shape[1]:].tolist()})
    save_file(tensors, os.path.join(args.out, "golden_logits.safetensors"))
    with open(os.path.join(args.out, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "CORPUS.txt"), "w") as f:
        f.write("\n".join(files) + "\n")
    for p in PROMPTS:
        enc = hf_tok(p, return_tensors="pt")
        out = ref.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=eos)
        print(repr(hf_tok.decode(out[0])))
    print(sorted(os.listdir(args.out)))


if __name__ == "__main__":
    main()
