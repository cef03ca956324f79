"""The acceptance replay's inputs for EAGLE-3 heads: one match vector per draft depth.

A draft model's draft j depends only on tokens, so one teacher-forced pass
judges every chain (drafters/replay.py). A head's draft j > 0 reads the head's
own hidden state from draft j - 1, so each anchor unrolls the head's steps, as
the training does for all anchors at once (drafters/eagle3.py `_unrolled`: step j
at anchor s reads token s+1+j at position s+j, attends to step 0's keys
causally, then to the keys this anchor's own chain wrote). Step j reads the
target's tokens rather than the head's own drafts; that is exact for the chain
rule, because only leading drafts are judged and those equal the target's tokens.

Indexes, over the sequence prompt (P tokens) + output: the chain step that
starts with c output tokens produced drafts output[c], output[c+1], ...; its
draft at depth j (0-based) is the head's step-j argmax at anchor s = P + c - 2
(step 0 reads output[c-1] with the target's features at s). A trimmed head
drafts target id draft_id + d2t[draft_id], as vLLM maps it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.config import ExperimentConfig
from core.paths import target_model_arg
from drafters.dtypes import loaded_dtype
from drafters.eagle3 import load_head, target_features
from drafters.replay import batch_progress, length_batches, padded_inputs, target_key


@torch.no_grad()
def head_drafts(head, target_model, ids: torch.Tensor, mask: torch.Tensor, first_anchor: torch.Tensor,
                depths: int) -> torch.Tensor:
    """(B, depths, T) target ids: [b, j, s] is the head's step-j draft at anchor s, reading the
    tokens ids[b, s+1..s+1+j] (right-padded; mask 1 for real tokens); -1 where step j has no
    token to read or s < first_anchor[b] (anchors before the prompt's last position never draft)."""
    batch, length = ids.shape
    features, _ = target_features(target_model, ids, mask, head.aux_layer_ids, logits=False)
    embeds = head.embed(ids)
    positions = torch.arange(length, device=ids.device).expand(batch, length)
    anchor_ok = positions >= first_anchor[:, None]
    to_target = None if head.target_ids is None else torch.tensor(head.target_ids, device=ids.device)
    drafts = torch.full((batch, depths, length), -1, dtype=torch.long, device=ids.device)
    hidden, past = features, []
    for j in range(min(depths, length - 1)):
        shift = 1 + j
        step_embeds = torch.zeros_like(embeds)
        step_embeds[:, :length - shift] = embeds[:, shift:]
        select = torch.zeros_like(anchor_ok)
        select[:, :length - shift] = anchor_ok[:, :length - shift] & mask[:, shift:].bool()
        logits, hidden = head(hidden, step_embeds, positions + j, mask, past, select=select)
        guess = logits.argmax(dim=-1)
        drafts[:, j][select] = guess if to_target is None else to_target[guess]
    return drafts


def depth_strings(drafts: torch.Tensor, prompt_tokens: int, output_ids: list[int]) -> list[str]:
    """One string per depth j over output positions c: "1" iff the depth-j draft of the chain
    step starting at c equals output[c+j] ("0" at c = 0, which the prefill samples, and where
    c + j lies past the output). drafts: (depths, T) of `head_drafts` for one row."""
    n = len(output_ids)
    output = torch.tensor(output_ids, device=drafts.device)
    strings = []
    for j in range(drafts.shape[0]):
        judged = max(0, n - 1 - j)  # c = 1 .. n-1-j
        start = prompt_tokens - 1  # the anchor of c = 1
        hits = (drafts[j, start:start + judged] == output[1 + j:1 + j + judged]).tolist()
        strings.append("0" + "".join("1" if h else "0" for h in hits) + "0" * (n - 1 - judged))
    return strings


def load_models(config: ExperimentConfig, directory: Path, device: str):
    """(the target, the head), both in the served dtype on `device`, ready for inference."""
    from transformers import AutoModelForCausalLM  # here: importing transformers takes seconds

    dtype = loaded_dtype(config.target.dtype)
    target = AutoModelForCausalLM.from_pretrained(target_model_arg(config), dtype=dtype).to(device).eval()
    head = load_head(directory, target)  # float32 weights; the shared embedding stays the target's
    return target, served_head(head.to(device), target.dtype)


def served_head(head, dtype: torch.dtype):
    """The head's weights in the served dtype, for inference. Its rotary frequencies stay float32:
    vLLM computes the angles in float32 too (and only rounds cos and sin), while a bf16 frequency
    would be off by radians at a long context's positions."""
    for param in head.parameters():
        param.data = param.data.to(dtype)
    return head.eval()


def head_matches(config: ExperimentConfig, directory: Path, targets: list[dict], depths: int, progress=print):
    """Yield {"id", "key", "match", "in_vocab", "depth_match"} per target: depth_match holds
    `depths` strings (depth_strings), match is depth 0's, in_vocab marks the output tokens inside
    the head's vocabulary. Batched as drafters/replay.py's teacher-forced pass."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU host's replay runs on its GPU
    target, head = load_models(config, directory, device)
    kept = head.t2d.cpu() if head.target_ids is not None else None
    batches = length_batches(targets, config.replay.batch_tokens)
    report, done = batch_progress(len(targets), len(batches), progress), 0
    with torch.inference_mode():
        for number, batch in enumerate(batches, start=1):
            yield from _batch_lines(head, target, [targets[i] for i in batch], depths, kept, device)
            done += len(batch)
            report(number, done)


def _batch_lines(head, target_model, targets: list[dict], depths: int, kept, device):
    ids, mask = padded_inputs(targets)
    first_anchor = torch.tensor([len(t["prompt_ids"]) - 1 for t in targets])
    drafts = head_drafts(head, target_model, ids.to(device), mask.to(device), first_anchor.to(device), depths).cpu()
    for row, t in enumerate(targets):
        strings = depth_strings(drafts[row], len(t["prompt_ids"]), t["output_ids"])
        inside = kept[torch.tensor(t["output_ids"])].tolist() if kept is not None else [True] * len(t["output_ids"])
        yield {"id": t["id"], "key": target_key(t), "match": strings[0],
               "in_vocab": "".join("1" if v else "0" for v in inside), "depth_match": strings}
