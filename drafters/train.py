"""Distillation: teach a drafter to predict the target's next token on the
target's own greedy responses.

The loss is cross-entropy against the target's top-k distribution (renormalised
over the tokens the drafter can produce), optionally mixed with cross-entropy
on the greedy token. Only response positions are scored: they are what the
drafter proposes at serving time. The held-out metric is top-1 agreement with
the target's greedy token, which is exactly the per-token acceptance α of
greedy speculative decoding on those responses; `simulated_tau` turns the
per-position agreements into the mean acceptance length vLLM would report.

The loop is linear on purpose: batches, forward, loss, step, evaluate,
checkpoint, stop at the time or step budget.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core.contracts import training_window
from drafters.recipe import Recipe
from drafters.vocab import VocabMap

log = logging.getLogger(__name__)


@dataclass
class Example:
    task: str
    input_ids: torch.Tensor  # drafter ids: prompt tail + response
    first_scored: int  # index of the position that predicts response token 0
    topk_ids: torch.Tensor  # (response tokens, k) drafter ids, -1 = outside the vocabulary
    topk_logprobs: torch.Tensor  # (response tokens, k)


def make_example(task: str, response: dict, vocab: VocabMap, max_seq_len: int) -> Example | None:
    prompt_ids, output_ids = response["prompt_ids"], response["output_ids"]
    prompt_kept, output_kept = training_window(len(prompt_ids), len(output_ids), max_seq_len)
    if not output_kept:
        return None
    output = output_ids[:output_kept]
    prompt = prompt_ids[len(prompt_ids) - prompt_kept:]
    tokens = torch.tensor(prompt + output)
    # The last position never predicts anything we score.
    return Example(
        task=task,
        input_ids=vocab.inputs(tokens[:-1]),
        first_scored=len(prompt) - 1,
        topk_ids=vocab.outputs(torch.tensor(response["topk_ids"][: len(output)])),
        topk_logprobs=torch.tensor(response["topk_logprobs"][: len(output)], dtype=torch.float32),
    )


def batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[list[Example]]:
    """Length-sorted batches of at most `batch_tokens` padded tokens, in random order."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    out, current = [], []
    for example in ordered:
        longest = len(example.input_ids)
        if current and longest * (len(current) + 1) > batch_tokens:
            out.append(current)
            current = []
        current.append(example)
    if current:
        out.append(current)
    rng.shuffle(out)
    return out


def _collate(batch: list[Example], pad_id: int, device: torch.device):
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    rows, cols = [], []
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = e.input_ids
        mask[i, : len(e.input_ids)] = 1
        n = len(e.topk_ids)
        rows += [i] * n
        cols += range(e.first_scored, e.first_scored + n)
    topk_ids = torch.cat([e.topk_ids for e in batch])
    topk_logprobs = torch.cat([e.topk_logprobs for e in batch])
    return (ids.to(device), mask.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device),
            topk_ids.to(device), topk_logprobs.to(device))


def scored_logits(model, ids, mask, rows, cols):
    """Logits at the scored positions only: the head is the costly part on a CPU."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden[rows, cols])


def distillation_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      hard_weight: float) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    in_vocab = topk_ids >= 0
    weights = torch.softmax(topk_logprobs.masked_fill(~in_vocab, float("-inf")), dim=-1)
    usable = in_vocab.any(dim=-1)
    picked = logp.gather(1, topk_ids.clamp(min=0))
    soft = -(weights.nan_to_num(0.0) * picked).sum(-1)
    greedy_known = in_vocab[:, 0]
    hard = -picked[:, 0]
    soft_loss = soft[usable].mean() if usable.any() else logits.sum() * 0
    hard_loss = hard[greedy_known].mean() if greedy_known.any() else logits.sum() * 0
    return (1 - hard_weight) * soft_loss + hard_weight * hard_loss


@torch.no_grad()
def agreement(model, examples: list[Example], pad_id: int, device: torch.device,
              batch_tokens: int) -> list[tuple[str, torch.Tensor]]:
    """Per example: (task, whether the drafter's top-1 equals the target's greedy token at each response position)."""
    model.eval()
    hits: list[tuple[str, torch.Tensor]] = []
    for batch in batches(examples, batch_tokens, random.Random(0)):
        ids, mask, rows, cols, topk_ids, _ = _collate(batch, pad_id, device)
        predicted = scored_logits(model, ids, mask, rows, cols).argmax(-1)
        correct = (predicted == topk_ids[:, 0]).cpu()
        start = 0
        for e in batch:
            hits.append((e.task, correct[start:start + len(e.topk_ids)]))
            start += len(e.topk_ids)
    model.train()
    return hits


def simulated_tau(hits: list[torch.Tensor], k: int) -> float:
    """Mean acceptance length of greedy speculation with k drafts over these responses, from a
    teacher-forced pass: a step's j-th draft of response token r is judged by the same hits[r]."""
    return chain_tau([correct.expand(k, -1) for correct in hits], k)


def chain_tau(hits: list[torch.Tensor], k: int) -> float:
    """Mean acceptance length of greedy speculation with k drafts per step, over responses whose
    hits[j, r] says whether a step's draft j (0-based) of response token r is right.

    Response token 0 comes from prefill; each later step accepts the run of
    correct drafts (at most k) and adds the target's own token."""
    accepted_plus_one = []
    for hit in hits:
        position, n = 1, hit.shape[1]
        while position < n:
            run = 0
            while run < k and position + run < n and hit[run, position + run]:
                run += 1
            accepted_plus_one.append(run + 1)
            position += run + 1
    return sum(accepted_plus_one) / max(len(accepted_plus_one), 1)


def summarize_hits(hits: list[tuple[str, torch.Tensor]]) -> dict:
    """Top-1 agreement and simulated τ (K = 1..3), overall and per task."""
    def figures(selected: list[torch.Tensor]):
        correct = torch.cat(selected) if selected else torch.zeros(0)
        return {"top1_agreement": round(correct.float().mean().item(), 4) if len(correct) else None,
                "tokens": int(len(correct)),
                **{f"simulated_tau_k{k}": round(simulated_tau(selected, k), 3) for k in (1, 2, 3)}}
    by_task: dict[str, list[torch.Tensor]] = {}
    for task, h in hits:
        by_task.setdefault(task, []).append(h)
    return {**figures([h for _, h in hits]), "by_task": {t: figures(v) for t, v in sorted(by_task.items())}}


def budget_spent(recipe: Recipe, step: int, tokens: int) -> float:
    """The share of the recipe's budget spent: whichever of steps and tokens runs out first."""
    by_steps = step / recipe.max_steps if recipe.max_steps else 0.0
    by_tokens = tokens / recipe.max_train_tokens if recipe.max_train_tokens else 0.0
    return max(by_steps, by_tokens)


def scheduled_lr(recipe: Recipe, step: int, spent: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio over the budget (not over time)."""
    warm = min(1.0, (step + 1) / max(recipe.warmup_steps, 1))
    cosine = recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * spent))
    return recipe.learning_rate * warm * cosine


def pick_device(recipe: Recipe) -> torch.device:
    if recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def train(model, train_set: list[Example], holdout: list[Example], recipe: Recipe, pad_id: int,
          checkpoint: Path, progress=log.info) -> dict:
    """Train in place until the budget is spent; returns the training record for the card."""
    device = pick_device(recipe)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    model.to(device).train()
    if recipe.freeze_embedding:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "losses": [], "evaluations": []}
    # The epoch's batches still to come, as indexes into train_set, and the shuffling's state: saved with
    # every checkpoint, so that a resumed build trains on what an uninterrupted one would have.
    epoch_batches: list[list[int]] = []
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        epoch_batches = saved["epoch_batches"]
        rng.setstate(saved["rng"])
        progress(f"resumed from {checkpoint} at step {state['step']} ({state['seconds'] / 60:.1f} min)")
    index_of = {id(example): i for i, example in enumerate(train_set)}

    def evaluate():
        figures = summarize_hits(agreement(model, holdout, pad_id, device, recipe.batch_tokens))
        state["evaluations"].append({"step": state["step"], "minutes": round(state["seconds"] / 60, 2),
                                     "top1_agreement": figures["top1_agreement"]})
        return figures

    def done_fraction():
        return budget_spent(recipe, state["step"], state["tokens"])

    initial = evaluate() if state["step"] == 0 else None
    while done_fraction() < 1.0:
        if not epoch_batches:
            epoch_batches = [[index_of[id(example)] for example in batch]
                             for batch in batches(train_set, recipe.batch_tokens, rng)]
        batch = [train_set[i] for i in epoch_batches.pop()]
        started = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(recipe, state["step"], done_fraction())

        ids, mask, rows, cols, topk_ids, topk_logprobs = _collate(batch, pad_id, device)
        loss = distillation_loss(scored_logits(model, ids, mask, rows, cols), topk_ids, topk_logprobs,
                                 recipe.hard_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        state["step"] += 1
        state["tokens"] += sum(len(example.topk_ids) for example in batch)
        state["seconds"] += time.monotonic() - started
        state["losses"].append(round(loss.item(), 4))
        # The budget's last step is evaluated once, after the loop.
        if state["step"] % recipe.eval_every_steps == 0 and done_fraction() < 1.0:
            figures = evaluate()
            progress(f"step {state['step']}: loss {sum(state['losses'][-recipe.eval_every_steps:]) / recipe.eval_every_steps:.3f}, "
                     f"held-out top-1 agreement {figures['top1_agreement']:.3f}, "
                     f"{100 * done_fraction():.0f}% of the budget, {state['seconds'] / 60:.1f} min")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                        "epoch_batches": epoch_batches, "rng": rng.getstate()}, checkpoint)

    final = evaluate()
    progress(f"trained {state['step']} steps in {state['seconds'] / 60:.1f} min; "
             f"held-out top-1 agreement {final['top1_agreement']:.3f}")
    model.to("cpu")
    window = max(1, min(20, len(state["losses"]) // 4))
    return {
        "steps": state["step"],
        "train_tokens": state["tokens"],
        "train_minutes": round(state["seconds"] / 60, 2),
        "device": device.type,
        "loss_first": round(sum(state["losses"][:window]) / window, 4),
        "loss_last": round(sum(state["losses"][-window:]) / window, 4),
        "holdout_before": initial,
        "holdout_after": final,
        "evaluations": state["evaluations"],
    }
