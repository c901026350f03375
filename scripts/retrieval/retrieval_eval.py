"""Retrieval accuracy, golden prompts and consistency checks for the retrieval model."""
import contextlib
import json
import os

import torch
import torch.nn.functional as F

import hf_io


def autocast_for(device):
    """bf16 autocast on CUDA; nothing on the CPU (float32 there)."""
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def answer_logits(model, batch):
    """Logits [B, Q, A, vocab] (float32) predicting each answer token, and targets [B, Q, A]."""
    ids, pos = batch["ids"], batch["answer_pos"]
    h = model.hidden_states(ids)  # [B, T, hidden]
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None, None]
    logits = model.lm_head(h[rows, pos - 1]).float()
    targets = ids.gather(1, pos.flatten(1)).view_as(pos)
    return logits, targets, h


def retrieval_loss(model, batch, lm_weight=0.0, lm_positions=256, gen=None):
    """(loss, answer loss, per-question exact-match [B, Q] bool).

    The loss is the cross-entropy of the answer tokens plus `lm_weight` times the next-token
    loss at `lm_positions` random positions per sample (filler language modelling).
    """
    logits, targets, h = answer_logits(model, batch)
    answer = F.cross_entropy(logits.flatten(0, 2), targets.flatten())
    correct = (logits.argmax(-1) == targets).all(-1)
    loss = answer
    if lm_weight > 0:
        ids = batch["ids"]
        B, T = ids.shape
        k = min(lm_positions, T - 1)
        p = torch.randint(T - 1, (B, k), device=ids.device, generator=gen)
        rows = torch.arange(B, device=ids.device)[:, None]
        lm_logits = model.lm_head(h[rows, p]).float()
        lm = F.cross_entropy(lm_logits.flatten(0, 1), ids[rows, p + 1].flatten())
        loss = answer + lm_weight * lm
    return loss, answer, correct


@torch.no_grad()
def evaluate(model, task, lengths, samples, seed, device, batch_tokens=131072,
             questions=1):
    """Greedy answer exact match per length (teacher-forced argmax over all answer tokens,
    which equals greedy decoding's exact match), plus accuracy by needle depth quartile.

    Returns {str(length): {"accuracy", "samples", "by_depth_quartile"}}.
    """
    was_training = model.training
    model.eval()
    out = {}
    for T, n in zip(lengths, samples):
        gen = torch.Generator(device=task.device).manual_seed(seed + T)
        facts, q = task.shape_for(T, max_questions=questions)
        per_batch = max(1, min(n, batch_tokens // T))
        hits, depth_hits, depth_counts, done = 0, [0] * 4, [0] * 4, 0
        while done < n:
            b = min(per_batch, n - done)
            batch = task.sample(b, T, facts, q, gen)
            with autocast_for(device):
                logits, targets, _ = answer_logits(model, batch)
            ok = (logits.argmax(-1) == targets).all(-1)  # [b, Q]
            depth = (batch["needle_pos"].float() / T * 4).long().clamp(0, 3)
            for d, c in zip(depth.flatten().tolist(), ok.flatten().tolist()):
                depth_counts[d] += 1
                depth_hits[d] += int(c)
            hits += int(ok.sum())
            done += b
        total = n * q
        out[str(T)] = {"accuracy": hits / total, "samples": total,
                       "by_depth_quartile": [h / c if c else None
                                             for h, c in zip(depth_hits, depth_counts)]}
    model.train(was_training)
    return out


@torch.no_grad()
def golden_prompts(model, task, lengths, per_length, seed, device):
    """Sample prompts with expected answers and this model's greedy answer tokens."""
    model.eval()
    out = []
    for T in lengths:
        gen = torch.Generator(device=task.device).manual_seed(seed + T)
        for _ in range(per_length):
            p = task.prompt(T, gen)
            ids = torch.tensor([p["ids"]], device=device)
            greedy = []
            for _ in range(task.answer_len):  # greedy decoding, recomputing the prefix
                with autocast_for(device):
                    h = model.hidden_states(ids)
                nxt = int(model.lm_head(h[:, -1]).float().argmax(-1))
                greedy.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], 1)
            p["model_answer_ids"] = greedy
            p["model_correct"] = greedy == p["answer_ids"]
            out.append(p)
    return out


@torch.no_grad()
def check_reload(model, out_dir, ids):
    """Reloads the saved checkpoint with our own reader and compares it with `model`.

    Returns max |tensor difference| (against `model`'s weights cast to the stored dtype) and
    the max relative logit difference of float32 forward passes on `ids` [1, T] (CPU).
    """
    reloaded, stored = hf_io.load_checkpoint(out_dir)
    cpu = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensor_diff = max(float((cpu[k].to(v.dtype).float() - v.float()).abs().max())
                      for k, v in stored.items())
    ref = type(model)(model.shape).eval()
    ref.load_state_dict({k: v.to(stored["model.norm.weight"].dtype).float()
                         for k, v in cpu.items()})
    a, b = ref(ids.cpu()), reloaded(ids.cpu())
    logit_diff = float((a - b).abs().max() / a.abs().max().clamp_min(1e-9))
    return {"max_tensor_diff": tensor_diff, "max_rel_logit_diff": logit_diff,
            "tensors": len(stored)}


@torch.no_grad()
def check_embedded(embedded_dir):
    """Our Llama on the embedded model's weights vs its transformers fp32 golden logits."""
    reference_logits = os.path.join(embedded_dir, "golden_logits.safetensors")
    if not os.path.exists(reference_logits):
        return None
    model, _ = hf_io.load_checkpoint(embedded_dir)
    with open(os.path.join(embedded_dir, "golden.json")) as f:
        golden = json.load(f)
    refs, _ = hf_io.read_safetensors(reference_logits)
    worst = 0.0
    for entry in golden["logits"]:
        logits = model(torch.tensor([entry["ids"]]))[0, -entry["last_positions"]:]
        ref = refs[entry["name"]].float()
        worst = max(worst, float((logits - ref).abs().max() / ref.abs().max()))
    return worst


@torch.no_grad()
def hf_cross_check(out_dir, model, ids, device):
    """Where transformers is installed: its LlamaForCausalLM on the saved checkpoint vs ours
    (both float32 on `device`), max relative logit difference on ids [1, T]."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        ref = transformers.LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    except TypeError:  # transformers 4 spelling
        ref = transformers.LlamaForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    ref.to(device).eval()
    ours = type(model)(model.shape)
    stored, _ = hf_io.read_safetensors(os.path.join(out_dir, "model.safetensors"))
    ours.load_state_dict({k: v.float() for k, v in stored.items()},
                         strict=not model.shape.tie_word_embeddings)
    ours.to(device).eval()
    ids = ids.to(device)
    a = ref(input_ids=ids).logits.float()
    b = ours(ids)
    return {"transformers": transformers.__version__, "tokens": ids.shape[1],
            "max_rel_logit_diff": float((a - b).abs().max() / a.abs().max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
