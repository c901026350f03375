#!/usr/bin/env python3
"""Trains a small Llama on synthetic long-context key-value retrieval, saved in HF format.

    # GPU (one H100/H200, ~9 minutes, curriculum 128 -> 131072 tokens):
    python3 scripts/retrieval/train_retrieval_model.py --out models/retrieval
    # CPU smoke run (torch 1.13 is enough; < 2 minutes on 2 cores):
    /usr/bin/python3 scripts/retrieval/train_retrieval_model.py --device cpu --tiny --out /tmp/r

Why: random-weight models attend uniformly, so a sparse attention method can be fast and wrong
without anyone noticing. This model's answers must be copied from one fact far back in the
prompt, so dropping the wrong keys changes its output. See README.md beside this file.

Outputs in --out: config.json, model.safetensors (HF names, bf16 by default), tokenizer files
copied from models/embedded, train_log.jsonl, eval.json, golden.json. The best model so far
(by a fixed probe set) is saved every --ckpt-seconds, so a run cut off early still leaves a
usable checkpoint.
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time

START = time.time()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import hf_io  # noqa: E402
import retrieval_eval as rev  # noqa: E402
from bpe import ByteBPE  # noqa: E402
from model import LlamaForCausalLM, LlamaShape, parameter_count  # noqa: E402
from retrieval_data import RetrievalTask, self_check  # noqa: E402

# The retrieval mechanism is learned at 64 tokens (measured on an H100: ~3,000 steps of batch
# 256 at lr 2e-3; at 128 tokens it had not started after 2,500 steps), hence the first stage's
# large share of the training time; it may also overrun (see --gate-accuracy).
DEFAULT_LENGTHS = [64, 128, 512, 2048, 8192, 32768, 131072]
DEFAULT_SHARES = [0.25, 0.07, 0.07, 0.1, 0.14, 0.17, 0.2]
REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/retrieval")
    ap.add_argument("--embedded", default=os.path.join(REPO, "models", "embedded"),
                    help="directory with tokenizer.json (and the goldens checked at start)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: lengths 64-256")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-clock budget of the whole run (default 9, tiny 1.5)")
    ap.add_argument("--lengths", default=None,
                    help="curriculum, comma-separated (default 64,128,...,131072; tiny 64,128,256)")
    ap.add_argument("--shares", default=None,
                    help="fraction of the training time per stage (default by length)")
    ap.add_argument("--tokens-per-step", type=int, default=None,
                    help="batch = tokens-per-step / length, at least 1 (default 65536; tiny 2048)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--lm-weight", type=float, default=0.05,
                    help="weight of the filler next-token loss (answer loss has weight 1)")
    ap.add_argument("--lm-positions", type=int, default=None,
                    help="random positions per sample for the filler loss (default 64, tiny 8)")
    ap.add_argument("--mix-prob", type=float, default=0.2,
                    help="chance that a step uses an earlier curriculum length")
    ap.add_argument("--advance-accuracy", type=float, default=0.9,
                    help="leave a stage early once its running accuracy reaches this")
    ap.add_argument("--gate-accuracy", type=float, default=0.5,
                    help="a stage below this running accuracy may overrun its time, up to 2x")
    ap.add_argument("--min-stage-steps", type=int, default=150)
    ap.add_argument("--single-question-prob", type=float, default=0.0,
                    help="share of training batches with one question at the end (the form of "
                         "make_prompt.py's prompts and of the final evaluation)")
    ap.add_argument("--max-key-tokens", type=int, default=3)
    ap.add_argument("--question-every", type=int, default=128,
                    help="training samples ask one question per this many tokens (up to 8)")
    ap.add_argument("--key-source", choices=["lists", "vocab"], default="lists",
                    help="keys from word lists (1-3 tokens) or one-token vocabulary words")
    ap.add_argument("--value-source", choices=["digits", "words"], default="digits",
                    help="answers: 4-digit numbers (--value-tokens digit tokens) or one-token words")
    ap.add_argument("--value-tokens", type=int, default=2,
                    help="digit tokens per answer (2: 150 values; 4: 4530 values)")
    # Model shape (defaults: the embedded model's; --tiny: a much smaller one, because CPU
    # torch builds without an optimized BLAS run at a few GFLOP/s).
    ap.add_argument("--hidden-size", type=int, default=None, help="default 256 (tiny 64)")
    ap.add_argument("--layers", type=int, default=None, help="default 4 (tiny 2)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=None, help="default 64 (tiny 16)")
    ap.add_argument("--intermediate-size", type=int, default=None, help="default 768 (tiny 192)")
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--rope-scaling", choices=["llama3", "none"], default="llama3",
                    help="llama3: as models/embedded/config.json; none: plain RoPE")
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--eval-lengths", default=None, help="default 2048,8192,32768,131072")
    ap.add_argument("--eval-samples", default=None, help="per length, default 128,64,32,16")
    ap.add_argument("--ckpt-seconds", type=float, default=60.0)
    ap.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None,
                    help="start from this saved checkpoint (a --out of an earlier run) instead "
                         "of random weights; its shape overrides the size flags")
    ap.add_argument("--grow-layers", type=int, default=None,
                    help="with --init: grow the checkpoint to this many layers; the new layers "
                         "start as identities (o_proj and down_proj zero), so the grown model "
                         "computes what the checkpoint did")
    ap.add_argument("--grow-after", type=int, default=None,
                    help="with --grow-layers: insert the new layers after this many of the "
                         "checkpoint's layers (default: after all of them)")
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]
    size = (64, 2, 16, 192) if args.tiny else (256, 4, 64, 768)
    for name, default in zip(("hidden_size", "layers", "head_dim", "intermediate_size"), size):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.lm_positions = args.lm_positions or (8 if args.tiny else 64)
    if args.tiny:
        args.lengths = ints(args.lengths or "64,128,256")
        args.max_minutes = args.max_minutes or 1.5
        args.tokens_per_step = args.tokens_per_step or 2048
        args.eval_lengths = ints(args.eval_lengths or "128,256")
        args.eval_samples = ints(args.eval_samples or "32,16")
        args.warmup = min(args.warmup, 20)
        args.gate_accuracy = 0.0  # a CPU-sized run does not learn retrieval: move on in time
        args.min_stage_steps = min(args.min_stage_steps, 20)
        args.log_every = min(args.log_every, 10)
        args.ckpt_seconds = min(args.ckpt_seconds, 20)
    else:
        args.lengths = ints(args.lengths) if args.lengths else DEFAULT_LENGTHS
        args.max_minutes = args.max_minutes or 9.0
        args.tokens_per_step = args.tokens_per_step or 65536
        args.eval_lengths = ints(args.eval_lengths or "2048,8192,32768,131072")
        args.eval_samples = ints(args.eval_samples or "128,64,32,16")
    if args.shares:
        args.shares = [float(x) for x in args.shares.split(",")]
    elif args.lengths == DEFAULT_LENGTHS:
        args.shares = DEFAULT_SHARES
    else:
        args.shares = [1.0 / len(args.lengths)] * len(args.lengths)
    if len(args.shares) != len(args.lengths) or len(args.eval_samples) != len(args.eval_lengths):
        ap.error("--shares must match --lengths and --eval-samples --eval-lengths")
    return args


class Logger:
    """JSON lines into train_log.jsonl, echoed compactly to stdout."""

    def __init__(self, path):
        self.f = open(path, "w")

    def __call__(self, **rec):
        rec = dict(rec, seconds=round(time.time() - START, 2))
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in rec.items() if not isinstance(v, (dict, list))), flush=True)


def lr_at(args, step, frac):
    """Linear warm-up over --warmup steps, constant, then cosine to 10% over the final 25% of
    the training time (`frac` = elapsed fraction of the training time)."""
    warm = min(1.0, (step + 1) / args.warmup)
    decay = 1.0 if frac < 0.75 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (frac - 0.75) / 0.25))
    return args.lr * warm * decay


def make_optimizer(model, args):
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95),
                                 fused=args.device.startswith("cuda"))
    except (TypeError, RuntimeError):  # torch 1.13 has no fused AdamW
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def probe_score(model, task, args):
    """Mean exact-match accuracy on a fixed probe set (fixed seed, up to 4 lengths)."""
    lengths = sorted(set(args.lengths[-4:]))
    samples = [16 if args.tiny else max(2, min(32, 65536 // L)) for L in lengths]
    res = rev.evaluate(model, task, lengths, samples, seed=10_000 + args.seed,
                       device=args.device, questions=4 if not args.tiny else 1)
    return sum(r["accuracy"] for r in res.values()) / len(res), res



def grow_model(init_model, layers, after, checkpoint_layers):
    """A copy of init_model with layers - L new decoder layers inserted after `after` of its L
    layers (default: at the end). Each new layer's residual outputs (o_proj, down_proj) are zero,
    so the grown model's logits equal the checkpoint's; training then uses the new capacity."""
    old = init_model.shape
    if layers <= old.num_hidden_layers:
        sys.exit(f"--grow-layers {layers}: the checkpoint already has {old.num_hidden_layers}")
    after = old.num_hidden_layers if after is None else after
    if not 0 <= after <= old.num_hidden_layers:
        sys.exit(f"--grow-after {after}: must be in [0, {old.num_hidden_layers}]")
    shape = copy.deepcopy(old)
    shape.num_hidden_layers = layers
    model = LlamaForCausalLM(shape, checkpoint_layers=checkpoint_layers)
    src = init_model.state_dict()
    state = model.state_dict()
    added = layers - old.num_hidden_layers
    for name, t in src.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            j = i if i < after else i + added
            name = name.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1)
        state[name] = t.clone()
    for j in range(after, after + added):
        state[f"model.layers.{j}.self_attn.o_proj.weight"].zero_()
        state[f"model.layers.{j}.mlp.down_proj.weight"].zero_()
    model.load_state_dict(state)
    return model

def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    log = Logger(os.path.join(args.out, "train_log.jsonl"))
    deadline = START + args.max_minutes * 60
    reserve = 15.0 if args.tiny else 50.0  # final eval, save, golden prompts, checks
    train_end = deadline - reserve

    # Tokenizer, data, and the two correctness checks that need no GPU.
    tok_path = os.path.join(args.embedded, "tokenizer.json")
    bpe = ByteBPE(tok_path)
    task = RetrievalTask(bpe, value_tokens=args.value_tokens,
                         max_key_tokens=args.max_key_tokens, key_source=args.key_source,
                         value_source=args.value_source).to(device)
    task.question_every = args.question_every
    check = self_check(task, tok_path)
    log(event="data_check", **check)
    if not check["ok"]:
        sys.exit("data check failed: assembled ids differ from the tokenizer's encoding")
    embedded_err = rev.check_embedded(args.embedded)
    log(event="model_check", embedded_golden_max_rel_logit_diff=embedded_err)
    if embedded_err is not None and embedded_err > 1e-4:
        sys.exit("model check failed: our Llama does not reproduce the embedded goldens")

    shape = LlamaShape(vocab_size=bpe.vocab_size, hidden_size=args.hidden_size,
                       intermediate_size=args.intermediate_size,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                       tie_word_embeddings=args.tie_embeddings, rope_theta=args.rope_theta,
                       bos_token_id=bpe.bos_id, eos_token_id=bpe.eos_id)
    if args.rope_scaling == "none":
        shape.rope_scaling = None
    if args.init:
        init_model, _ = hf_io.load_checkpoint(args.init)
        shape = init_model.shape
        if args.grow_layers:
            model = grow_model(init_model, args.grow_layers, args.grow_after,
                               args.grad_checkpoint)
            shape = model.shape
        else:
            model = LlamaForCausalLM(shape, checkpoint_layers=args.grad_checkpoint)
            model.load_state_dict(init_model.state_dict())
        model = model.to(device)
        log(event="init", directory=args.init, layers=shape.num_hidden_layers,
            grown_from=init_model.shape.num_hidden_layers)
    else:
        model = LlamaForCausalLM(shape, checkpoint_layers=args.grad_checkpoint).to(device)
    opt = make_optimizer(model, args)
    hf_io.copy_tokenizer_files(args.embedded, args.out)
    # The task's settings, so that prompt writers (make_prompt_set.py --model) match training.
    hf_io.write_json(os.path.join(args.out, "retrieval_task.json"), {
        "value_tokens": args.value_tokens, "value_source": args.value_source,
        "max_key_tokens": args.max_key_tokens,
        "key_source": args.key_source})
    log(event="start", params=parameter_count(model), device=str(device),
        torch=torch.__version__, keys=len(task.keys), values=len(task.values),
        answer_tokens=task.answer_len, lengths=args.lengths, shares=args.shares,
        max_minutes=args.max_minutes)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    save_dtype = getattr(torch, args.save_dtype)
    best = {"score": -1.0}
    train_start = time.time()
    train_time = max(1.0, train_end - train_start)
    next_ckpt = train_start + args.ckpt_seconds
    step = 0

    def checkpoint(stage_length):
        score, res = probe_score(model, task, args)
        better = score >= best["score"]
        if better:
            best.update(score=score, step=step, length=stage_length,
                        state={k: v.detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items()})
            hf_io.save_checkpoint(model, args.out, save_dtype,
                                  {"step": step, "probe_score": f"{score:.4f}"})
        log(event="checkpoint", step=step, length=stage_length, probe_score=score,
            saved=better, probe={k: v["accuracy"] for k, v in res.items()})

    for si, (length, share) in enumerate(zip(args.lengths, args.shares)):
        # This stage's share of the training time that is left (earlier stages may have
        # finished early or overrun).
        stage_start = time.time()
        stage_budget = (train_end - stage_start) * share / sum(args.shares[si:])
        last = si == len(args.lengths) - 1
        stage_acc, stage_steps, window = None, 0, []
        while time.time() < train_end:
            T = length
            if si > 0 and random.random() < args.mix_prob:
                T = random.choice(args.lengths[:si])
            batch_size = max(1, min(args.max_batch, args.tokens_per_step // T))
            facts_max, questions = task.shape_for(T)
            if random.random() < args.single_question_prob:
                questions = 1  # the form the engine's prompts take: one question at the end
            facts = random.randint(questions + 1, facts_max)
            batch = task.sample(batch_size, T, facts, questions, gen)
            lr = lr_at(args, step, (time.time() - train_start) / train_time)
            for g in opt.param_groups:
                g["lr"] = lr
            with rev.autocast_for(device):
                loss, answer_loss, correct = rev.retrieval_loss(model, batch, args.lm_weight,
                                                                args.lm_positions, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            stage_steps += 1
            # Kept as tensors: reading them every step would synchronize with the GPU.
            window.append((T, loss.detach(), answer_loss.detach(), correct.float().mean()))
            if step % args.log_every == 0:
                main = [w for w in window if w[0] == length] or window
                mean = lambda rows, i: float(torch.stack([w[i] for w in rows]).mean())
                acc = mean(main, 3)
                stage_acc = acc if stage_acc is None else 0.5 * stage_acc + 0.5 * acc
                log(step=step, stage=si, length=length, batch=batch_size,
                    loss=mean(window, 1), answer_loss=mean(main, 2), accuracy=acc,
                    lr=lr, grad_norm=float(grad_norm))
                window = []
                spent = time.time() - stage_start
                learned = stage_acc >= args.advance_accuracy and stage_steps >= args.min_stage_steps
                out_of_time = spent >= stage_budget and (stage_acc >= args.gate_accuracy
                                                         or spent >= 2 * stage_budget)
                if not last and (learned or out_of_time):
                    break
            if time.time() >= next_ckpt:
                checkpoint(length)
                next_ckpt = time.time() + args.ckpt_seconds
        gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        log(event="stage_end", stage=si, length=length, steps=stage_steps,
            running_accuracy=stage_acc, stage_seconds=time.time() - stage_start,
            budget_seconds=stage_budget, peak_gib=gib)
        if time.time() >= train_end:
            break

    # Final: keep the better of the last model and the best checkpoint, evaluate, save.
    checkpoint(args.lengths[-1])
    model.load_state_dict(best["state"])
    with torch.no_grad():  # evaluate exactly what is saved: weights rounded to save_dtype
        for p in model.parameters():
            p.copy_(p.to(save_dtype).float())
    hf_io.save_checkpoint(model, args.out, save_dtype,
                          {"step": best["step"], "probe_score": f"{best['score']:.4f}"})
    log(event="final_model", step=best["step"], probe_score=best["score"])
    evaluation = rev.evaluate(model, task, args.eval_lengths, args.eval_samples,
                              seed=20_000 + args.seed, device=args.device)
    log(event="eval", results=evaluation)
    golden_lengths = [L for L in (2048, 8192) if L <= max(args.lengths)] or [args.lengths[-1]]
    golden = rev.golden_prompts(model, task, golden_lengths, 2, 30_000 + args.seed, device)
    hf_io.write_json(os.path.join(args.out, "golden.json"), {
        "about": "retrieval prompts (ids include BOS; text excludes it) with expected answers "
                 "and this model's greedy answer tokens (our PyTorch, bf16 autocast on CUDA)",
        "prompts": golden})
    # Consistency checks of the saved files: our reader, and transformers where installed.
    probe_ids = torch.tensor([golden[0]["ids"][:min(512, len(golden[0]["ids"]))]])
    reload = rev.check_reload(model, args.out, probe_ids)
    log(event="reload_check", **reload)
    try:
        hf = rev.hf_cross_check(args.out, model, torch.tensor([golden[0]["ids"]]), device)
    except Exception as e:  # report, never lose the run over the optional check
        hf = {"error": repr(e)[:300]}
    log(event="hf_check", result=hf)
    hf_io.write_json(os.path.join(args.out, "eval.json"), {
        "accuracy": {k: v["accuracy"] for k, v in evaluation.items()},
        "details": evaluation, "step": best["step"], "probe_score": best["score"],
        "steps_total": step, "seconds": round(time.time() - START, 1), "device": str(device),
        "answer_tokens": task.answer_len, "reload_check": reload, "hf_check": hf,
        "embedded_golden_check": embedded_err, "data_check": check})
    print("eval accuracy:", {k: round(v["accuracy"], 3) for k, v in evaluation.items()})
    if reload["max_rel_logit_diff"] > 1e-5 or reload["max_tensor_diff"] > 0:
        sys.exit("reload check failed")


if __name__ == "__main__":
    main()
