"""EAGLE-3 heads: one decoder layer that drafts from the target's own hidden states.

The head is the network vLLM serves as `Eagle3LlamaForCausalLM` (`"method": "eagle3"`):
`fc` folds the target's hidden states at three aux layers (3 x H) into one
hidden state; the decoder layer's attention reads [embedding of the next token ;
that hidden state] (2 x H); its final norm and `lm_head` give logits over the
draft vocabulary. The token embedding is the target's (frozen, never saved:
vLLM shares the target's when the head ships none), and so is `lm_head` when the
draft vocabulary is the target's; a trimmed vocabulary gets its own `lm_head`
(started from the target's rows), with `d2t` (draft id -> target id offset) and
`t2d` (which target ids are kept) saved beside it.

How vLLM drafts K tokens, which the training reproduces (training-time test):
at position t the head reads the target's features at t and the embedding of
token t+1, and predicts token t+2. Draft step j > 1 at the same anchor t reads
the head's own pre-norm output of step j-1 instead of the target's features,
the embedding of token t+j, at position t+j-1, and attends to step 1's keys at
positions <= t plus the keys steps 2..j wrote for this anchor.

The aux layer ids follow vLLM: id L is the residual stream entering target layer
L (the output of layer L-1, before any final norm), which is transformers'
`hidden_states[L]` for L < num_layers; vLLM concatenates them in layer order, and
picks (2, n // 2, n - 3) when the config names none.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from core.arms import TRAINED_STEPS_FIELD  # beside the launcher, which checks an arm's K against it
from drafters.dtypes import dtype_name, saved_dtype
from drafters.recipe import HeadRecipe
from drafters.train import (Example, batches, budget_spent, chain_tau, distillation_loss, make_example,
                            pick_device, scheduled_lr)
from drafters.vocab import VocabMap

log = logging.getLogger(__name__)

# vLLM maps both names to Eagle3LlamaForCausalLM; this one is the name EAGLE-3 checkpoints ship with.
ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS_FILE = "model.safetensors"
# The target's features of every training example are computed once and kept in memory when they fit
# under this (float32, on the CPU): otherwise every step runs the whole target again.
FEATURE_CACHE_MAX_BYTES = 8 * 2**30


def default_aux_layers(num_layers: int) -> list[int]:
    """The aux layers vLLM uses when the head's config names none."""
    return [2, num_layers // 2, num_layers - 3]


def head_config(target_config, target_ids: list[int] | None, aux_layer_ids: list[int] | None,
                norm_before_residual: bool) -> LlamaConfig:
    """The head's config.json: one Llama layer of the target's width, and the four EAGLE-3 fields set explicitly."""
    # vLLM concatenates the aux states in layer order, collecting each layer once.
    wanted = list(aux_layer_ids or default_aux_layers(target_config.num_hidden_layers))
    layers = sorted(set(wanted))
    if len(layers) != len(wanted) or layers[0] < 0 or layers[-1] > target_config.num_hidden_layers:
        raise ValueError(f"aux layers {wanted}: need distinct ids in 0..{target_config.num_hidden_layers} "
                         "(vLLM's default, (2, n // 2, n - 3), repeats one for targets under 7 layers)")
    hidden = target_config.hidden_size
    config = LlamaConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=target_config.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=target_config.num_attention_heads,
        num_key_value_heads=target_config.num_key_value_heads,
        head_dim=getattr(target_config, "head_dim", None) or hidden // target_config.num_attention_heads,
        hidden_act=target_config.hidden_act,
        max_position_embeddings=target_config.max_position_embeddings,
        rms_norm_eps=target_config.rms_norm_eps,
        rope_parameters=getattr(target_config, "rope_parameters", None),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=target_config.bos_token_id,
        eos_token_id=target_config.eos_token_id,
        pad_token_id=getattr(target_config, "pad_token_id", None),
        draft_vocab_size=len(target_ids) if target_ids is not None else target_config.vocab_size,
        target_hidden_size=hidden,
        eagle_aux_hidden_state_layer_ids=layers,
        norm_before_residual=norm_before_residual,
    )
    config.architectures = [ARCHITECTURE]
    return config


class _Shared(nn.Module):
    """A frozen target tensor (embedding or output head): a buffer outside the state dict, so
    checkpoints and the saved head leave it out and the target supplies it."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach(), persistent=False)


class _Attention(nn.Module):
    """Llama attention whose q/k/v read 2 x H, with the unrolled steps' keys of the training-time test."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(2 * config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past: list):
        batch, length, _ = x.shape

        def split(t, n):
            return t.view(batch, length, n, self.head_dim).transpose(1, 2)

        q, k = apply_rotary_pos_emb(split(self.q_proj(x), self.heads), split(self.k_proj(x), self.kv_heads), cos, sin)
        v = split(self.v_proj(x), self.kv_heads)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        past.append((k, v))
        scale = self.head_dim ** -0.5
        # Step 1's keys, causally; then, for steps 2..j, only the key this anchor's own chain wrote.
        first_k, first_v = past[0]
        scores = (q @ first_k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        chain = past[1:]
        if chain:
            own = torch.stack([(q * ki).sum(-1) for ki, _ in chain], dim=-1) * scale
            scores = torch.cat([scores, own], dim=-1)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = probs[..., :length] @ first_v
        if chain:
            values = torch.stack([vi for _, vi in chain], dim=-2)
            out = out + (probs[..., length:].unsqueeze(-1) * values).sum(-2)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class _Layer(nn.Module):
    """vLLM's first EAGLE-3 decoder layer: normed [embedding ; hidden] into attention, then the MLP."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = _Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.norm_before_residual = config.norm_before_residual

    def forward(self, embeds, hidden, cos, sin, mask, past):
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        residual = residual + self.self_attn(x, cos, sin, mask, past)
        return residual + self.mlp(self.post_attention_layernorm(residual))


class Eagle3Head(nn.Module):
    """An EAGLE-3 head for a target with config `target_config`.

    `target_embedding` and `target_lm_head` are the target's weights: the embedding
    is used frozen; the output head is shared frozen for the full vocabulary, or
    its `target_ids` rows start the head's own trainable `lm_head`. Parameter
    names are the checkpoint names vLLM's loader maps."""

    def __init__(self, target_config, target_embedding: torch.Tensor, target_lm_head: torch.Tensor,
                 target_ids: list[int] | None = None, aux_layer_ids: list[int] | None = None,
                 norm_before_residual: bool = False):
        super().__init__()
        self.config = config = head_config(target_config, target_ids, aux_layer_ids, norm_before_residual)
        self.trained_draft_steps = 0
        hidden = config.hidden_size
        self.embed_tokens = _Shared(target_embedding)
        self.fc = nn.Linear(len(self.aux_layer_ids) * config.target_hidden_size, hidden, bias=False)
        self.layers = nn.ModuleList([_Layer(config)])
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(config)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.initializer_range)
        if target_ids is None:
            self.lm_head = _Shared(target_lm_head)
        else:
            rows = target_lm_head.detach()[torch.tensor(target_ids, device=target_lm_head.device)]
            self.lm_head = nn.Linear(hidden, len(target_ids), bias=False)
            self.lm_head.weight.data.copy_(rows)
            ids = torch.tensor(target_ids)
            self.register_buffer("d2t", ids - torch.arange(len(target_ids)))
            kept = torch.zeros(config.vocab_size, dtype=torch.bool)
            kept[ids] = True
            self.register_buffer("t2d", kept)
        self.target_ids = target_ids

    @property
    def aux_layer_ids(self) -> list[int]:
        return list(self.config.eagle_aux_hidden_state_layer_ids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens.weight)

    def forward(self, hidden: torch.Tensor, input_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, past: list | None = None,
                select: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step.

        hidden: (B, T, 3H) target features (step 1) or (B, T, H) the previous step's output;
        input_embeds: (B, T, H) embeddings of the tokens this step reads; position_ids: (B, T);
        attention_mask: (B, T), 1 for real tokens; past: the earlier steps' keys, appended to
        (a fresh list for step 1); select: (B, T) bool, compute logits there only (the output
        head is the costly part on a CPU).
        Returns (logits over the draft vocabulary, (B, T, V) or (selected, V); the pre-norm
        hidden state (B, T, H) that the next step reads)."""
        past = [] if past is None else past
        if hidden.shape[-1] == self.fc.in_features:
            hidden = self.fc(hidden)
        length = hidden.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        if attention_mask is None:
            mask = causal[None, None]
        else:
            # A query always sees itself, so that a padded one gets no empty row.
            keys = attention_mask.bool()[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=hidden.device)
            mask = causal[None, None] & keys
        cos, sin = self.rotary(hidden, position_ids)
        out = self.layers[0](input_embeds, hidden, cos, sin, mask, past)
        normed = self.norm(out if select is None else out[select])
        return F.linear(normed, self.lm_head.weight), out


def head_from_target(target_model, target_ids: list[int] | None = None, aux_layer_ids: list[int] | None = None,
                     norm_before_residual: bool = False) -> Eagle3Head:
    """A freshly initialised head for `target_model` (a transformers causal LM)."""
    return Eagle3Head(target_model.config, target_model.get_input_embeddings().weight,
                      target_model.get_output_embeddings().weight, target_ids, aux_layer_ids, norm_before_residual)


class _AuxLayersDone(Exception):
    """Raised once the deepest aux layer's input is captured: the target's later layers are not needed."""


@torch.no_grad()
def target_features(target_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    layer_ids: list[int], logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the target's hidden states at the aux layers as vLLM feeds the head, (B, T, 3H) in layer
    order; the target's next-token logits, (B, T, V), or None with logits=False: the training
    takes the target's top-k from the response cache, and a 49k-row output head is most of the
    target's cost on a CPU).

    Layer id L is what enters target layer L (transformers' `hidden_states[L]`), and L = num_layers
    is the last layer's output before the final norm. Without logits the target stops at the deepest
    aux layer (27 of SmolLM2's 30 layers run)."""
    layer_ids = sorted(layer_ids)
    body = target_model.model
    num_layers = target_model.config.num_hidden_layers
    stop_at = None if logits or layer_ids[-1] == num_layers else layer_ids[-1]
    captured: dict[int, torch.Tensor] = {}

    def capture(layer_id: int):
        def hook(module, args, kwargs):
            captured[layer_id] = args[0] if args else kwargs["hidden_states"]
            if layer_id == stop_at:
                raise _AuxLayersDone
        return hook

    modules = [body.norm if i == num_layers else body.layers[i] for i in layer_ids]
    hooks = [m.register_forward_pre_hook(capture(i), with_kwargs=True) for m, i in zip(modules, layer_ids)]
    out = None
    try:
        out = (target_model if logits else body)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _AuxLayersDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([captured[i] for i in layer_ids], dim=-1), out.logits if logits else None


def weights_in(model, dtype: torch.dtype):
    """`model`, or a copy of it with its weights in `dtype`; its buffers (the rotary frequencies) stay
    float32, as in a model loaded in that dtype."""
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    twin = copy.deepcopy(model)
    for parameter in twin.parameters():
        parameter.data = parameter.data.to(dtype)
    return twin


def head_example(task: str, response: dict, vocab: VocabMap, max_seq_len: int) -> Example | None:
    """A training example for a head: as train.make_example, but its inputs stay target ids (the
    target reads them and the head embeds them with the target's embedding); top-k ids are draft ids."""
    identity = VocabMap(len(vocab.to_draft), None, unk_id=0)
    example = make_example(task, response, identity, max_seq_len)
    if example is not None:
        example.topk_ids = vocab.outputs(example.topk_ids)
    return example


def collate(batch: list[Example], pad_id: int, device: torch.device):
    """Padded target ids, their mask, the first anchor of each row, and the target's top-k laid out
    by the position whose next token it describes (-1 ids where there is none)."""
    length = max(len(e.input_ids) for e in batch)
    k = batch[0].topk_ids.shape[1]
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    topk_ids = torch.full((len(batch), length, k), -1, dtype=torch.long)
    topk_logprobs = torch.zeros((len(batch), length, k))
    has_row = torch.zeros((len(batch), length), dtype=torch.bool)
    first_anchor = torch.zeros(len(batch), dtype=torch.long)
    for i, e in enumerate(batch):
        n, rows = len(e.input_ids), len(e.topk_ids)
        ids[i, :n], mask[i, :n] = e.input_ids, 1
        topk_ids[i, e.first_scored:e.first_scored + rows] = e.topk_ids
        topk_logprobs[i, e.first_scored:e.first_scored + rows] = e.topk_logprobs
        has_row[i, e.first_scored:e.first_scored + rows] = True
        # vLLM's first draft reads the first response token (drafted after prefill) at the prompt's last position.
        first_anchor[i] = e.first_scored
    return [t.to(device) for t in (ids, mask, first_anchor, topk_ids, topk_logprobs, has_row)]


@torch.no_grad()
def example_features(target_model, examples: list[Example], layer_ids: list[int], pad_id: int,
                     device: torch.device, batch_tokens: int) -> dict[int, torch.Tensor] | None:
    """id(example) -> its target features (tokens, aux layers x hidden), float32 on the CPU; None when
    they would take more than FEATURE_CACHE_MAX_BYTES. A position's features depend only on the tokens
    up to it (causal, right-padded), so they are the same in any batch."""
    width = len(layer_ids) * target_model.config.hidden_size
    if sum(len(e.input_ids) for e in examples) * width * 4 > FEATURE_CACHE_MAX_BYTES:
        return None
    cache = {}
    for batch in batches(examples, batch_tokens, random.Random(0)):
        ids, mask = collate(batch, pad_id, device)[:2]
        features, _ = target_features(target_model, ids, mask, layer_ids, logits=False)
        for i, example in enumerate(batch):
            cache[id(example)] = features[i, :len(example.input_ids)].float().cpu().clone()  # not a view of the batch
    return cache


def _batch_features(cache: dict[int, torch.Tensor], batch: list[Example], length: int, device) -> torch.Tensor:
    """The cached features of a batch, right-padded with zeros (padded positions are never read)."""
    width = cache[id(batch[0])].shape[1]
    features = torch.zeros((len(batch), length, width), device=device)
    for i, example in enumerate(batch):
        features[i, :len(example.input_ids)] = cache[id(example)]
    return features


def _unrolled(head, target_model, batch, pad_id, device, ttt_steps: int, cache: dict | None = None):
    """Per unrolled draft step: (logits at the scored anchors, their target top-k ids and log-probs,
    the (B, T) mask of those anchors). The target's features come from `cache` (example_features)
    when given, else from running the target on the batch.

    Step j (0-based) at anchor t reads token t+1+j at position t+j and predicts the target's
    distribution at position t+1+j; anchors before the prompt's last position are never drafted."""
    ids, mask, first_anchor, topk_ids, topk_logprobs, has_row = collate(batch, pad_id, device)
    if cache is None:
        features = target_features(target_model, ids, mask, head.aux_layer_ids, logits=False)[0].float()
    else:
        features = _batch_features(cache, batch, ids.shape[1], device)
    embeds = head.embed(ids)
    length = ids.shape[1]
    positions = torch.arange(length, device=device).expand_as(ids)
    anchor_ok = positions >= first_anchor[:, None]
    hidden, past, out = features, [], []
    for j in range(ttt_steps):
        shift = 1 + j
        step_embeds = torch.zeros_like(embeds)
        step_embeds[:, :length - shift] = embeds[:, shift:]
        scored = torch.zeros_like(anchor_ok)
        scored[:, :length - shift] = anchor_ok[:, :length - shift] & has_row[:, shift:]
        logits, hidden = head(hidden, step_embeds, positions + j, mask, past, select=scored)
        out.append((logits, topk_ids[:, shift:][scored[:, :length - shift]],
                    topk_logprobs[:, shift:][scored[:, :length - shift]], scored))
    return out


@torch.no_grad()
def head_agreement(head, target_model, examples: list[Example], pad_id: int, device: torch.device,
                   batch_tokens: int, ttt_steps: int, cache: dict | None = None) -> dict:
    """Held-out figures, as a draft model's card has them (top-1 agreement at the first draft,
    simulated tau at each K up to ttt_steps, both per task too), and the top-1 agreement at each
    unrolled step (step j counts the anchors where j + 1 tokens can be checked)."""
    head.eval()
    per_example: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (task, hit, scored), each (steps, tokens)
    for batch in batches(examples, batch_tokens, random.Random(0)):
        rows = [(e.task, torch.zeros(ttt_steps, len(e.topk_ids), dtype=torch.bool),
                 torch.zeros(ttt_steps, len(e.topk_ids), dtype=torch.bool)) for e in batch]
        for j, (logits, ids, _, scored) in enumerate(_unrolled(head, target_model, batch, pad_id, device, ttt_steps, cache)):
            scored = scored.cpu()
            right = torch.zeros(scored.shape, dtype=torch.bool)
            right[scored] = (logits.argmax(-1) == ids[:, 0]).cpu()
            for i, (e, (_, hit, seen)) in enumerate(zip(batch, rows)):
                # Step j drafts response token r from anchor t = first_scored + r - 1 - j.
                n, start = len(e.topk_ids), e.first_scored
                if n > 1 + j:
                    hit[j, 1 + j:] = right[i, start:start + n - 1 - j]
                    seen[j, 1 + j:] = scored[i, start:start + n - 1 - j]
        per_example += rows
    head.train()

    def figures(selected):
        counts = [(sum(int(h[j][s[j]].sum()) for h, s in selected), sum(int(s[j].sum()) for _, s in selected))
                  for j in range(ttt_steps)]
        by_step = [round(hits / n, 4) if n else None for hits, n in counts]
        return {"top1_agreement": by_step[0], "tokens": counts[0][1],
                **{f"simulated_tau_k{k}": round(chain_tau([h for h, _ in selected], k), 3)
                   for k in range(1, ttt_steps + 1)},
                "top1_agreement_by_step": by_step, "tokens_by_step": [n for _, n in counts]}

    tasks = sorted({task for task, _, _ in per_example})
    return {**figures([(h, s) for _, h, s in per_example]),
            "by_task": {t: figures([(h, s) for task, h, s in per_example if task == t]) for t in tasks}}


def train_step(head, target_model, batch: list[Example], optimizer, hard_weight: float, ttt_steps: int,
               step_decay: float, pad_id: int, device, cache: dict | None) -> torch.Tensor:
    """One optimiser step on `batch`: the unrolled draft steps' summed distillation loss (step j weighted
    step_decay ** j), its gradient clipped to norm 1. Returns the loss."""
    steps = _unrolled(head, target_model, batch, pad_id, device, ttt_steps, cache)
    loss = sum(step_decay ** j * distillation_loss(logits, ids, logprobs, hard_weight)
               for j, (logits, ids, logprobs, _) in enumerate(steps))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in head.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return loss


def train_head(head: Eagle3Head, target_model, train_set: list[Example], holdout: list[Example], recipe: HeadRecipe,
               checkpoint: Path, ttt_steps: int = 2, step_decay: float = 1.0, pad_id: int = 0,
               feature_dtype: str = "float32", progress=log.info) -> dict:
    """Train the head in place with `ttt_steps` unrolled draft steps until the recipe's step or token
    budget is spent; the loss is the sum over steps of the distillation loss (step j weighted by
    step_decay ** j). Returns the training record for the card.

    The target's features come from a pass in `feature_dtype` (the build passes the dtype the arms
    serve: the head then learns from the hidden states vLLM will feed it), the head trains in float32."""
    device = pick_device(recipe)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    target_model.to(device).eval().requires_grad_(False)
    # Only the features are read from this model (the head holds its own copy of the embedding).
    features_dtype = saved_dtype(feature_dtype)
    features_from = weights_in(target_model, features_dtype)
    head.to(device).train()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "losses": [], "evaluations": []}
    # The epoch's remaining batches (indexes into train_set) and the RNGs: a resumed build trains on
    # what an uninterrupted one would have.
    epoch_batches: list[list[int]] = []
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        head.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state, epoch_batches = saved["state"], saved["epoch_batches"]
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        progress(f"resumed from {checkpoint} at step {state['step']} ({state['seconds'] / 60:.1f} min)")
    index_of = {id(example): i for i, example in enumerate(train_set)}
    started = time.monotonic()
    # One cache for both sets, so that the memory limit bounds what training holds.
    featured = train_set + holdout
    cache = example_features(features_from, featured, head.aux_layer_ids, pad_id, device, recipe.batch_tokens)
    tokens = sum(len(e.input_ids) for e in featured)
    progress(f"target features of {tokens} tokens computed once in {feature_dtype} ({time.monotonic() - started:.0f}s)"
             if cache is not None else
             f"target features of {tokens} tokens exceed {FEATURE_CACHE_MAX_BYTES / 2**30:.0f} GiB: "
             "every step runs the target")

    def evaluate():
        figures = head_agreement(head, features_from, holdout, pad_id, device, recipe.batch_tokens, ttt_steps, cache)
        state["evaluations"].append({"step": state["step"], "minutes": round(state["seconds"] / 60, 2),
                                     "top1_agreement": figures["top1_agreement"],
                                     "top1_agreement_by_step": figures["top1_agreement_by_step"]})
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

        loss = train_step(head, features_from, batch, optimizer, recipe.hard_weight, ttt_steps, step_decay, pad_id,
                          device, cache)

        state["step"] += 1
        state["tokens"] += sum(len(example.topk_ids) for example in batch)
        state["seconds"] += time.monotonic() - started
        state["losses"].append(round(loss.item(), 4))
        # The budget's last step is evaluated once, after the loop.
        if state["step"] % recipe.eval_every_steps == 0 and done_fraction() < 1.0:
            figures = evaluate()
            progress(f"step {state['step']}: loss {sum(state['losses'][-recipe.eval_every_steps:]) / recipe.eval_every_steps:.3f}, "
                     f"held-out top-1 agreement by step {figures['top1_agreement_by_step']}, "
                     f"{100 * done_fraction():.0f}% of the budget, {state['seconds'] / 60:.1f} min")
            torch.save({"model": head.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                        "epoch_batches": epoch_batches, "rng": rng.getstate(), "torch_rng": torch.get_rng_state()},
                       checkpoint)

    final = evaluate()
    progress(f"trained {state['step']} steps ({ttt_steps} draft steps unrolled) in {state['seconds'] / 60:.1f} min; "
             f"held-out top-1 agreement by step {final['top1_agreement_by_step']}")
    head.to("cpu")
    target_model.to("cpu")
    head.trained_draft_steps = ttt_steps
    window = max(1, min(20, len(state["losses"]) // 4))
    return {
        "steps": state["step"],
        "train_tokens": state["tokens"],
        "train_minutes": round(state["seconds"] / 60, 2),
        "device": device.type,
        "ttt_steps": ttt_steps,
        "step_decay": step_decay,
        "feature_dtype": dtype_name(features_dtype),
        "loss_first": round(sum(state["losses"][:window]) / window, 4),
        "loss_last": round(sum(state["losses"][-window:]) / window, 4),
        "holdout_before": initial,
        "holdout_after": final,
        "evaluations": state["evaluations"],
    }


def save_head(head: Eagle3Head, directory: Path, dtype: str = "bfloat16", trained_draft_steps: int | None = None) -> None:
    """The head as vLLM loads it: model.safetensors (no embedding; no lm_head when it is the target's;
    d2t and t2d when the vocabulary is trimmed) and config.json, recording the draft steps it was
    trained for."""
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = saved_dtype(dtype)
    tensors = {name: (t.to(torch_dtype) if t.is_floating_point() else t).contiguous().cpu()
               for name, t in head.state_dict().items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = head.config.to_dict()
    config["dtype"] = dtype_name(torch_dtype)
    config[TRAINED_STEPS_FIELD] = trained_draft_steps if trained_draft_steps is not None else head.trained_draft_steps
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_head(directory: Path, target_model) -> Eagle3Head:
    """A saved head as float32, ready to train further; `target_model` supplies the shared weights."""
    config = json.loads((directory / "config.json").read_text())
    if config["target_hidden_size"] != target_model.config.hidden_size:
        raise ValueError(f"{directory}: a head for hidden size {config['target_hidden_size']}, "
                         f"not this target's {target_model.config.hidden_size}")
    tensors = load_file(directory / WEIGHTS_FILE)
    target_ids = None
    if "d2t" in tensors:
        target_ids = (tensors["d2t"] + torch.arange(len(tensors["d2t"]))).tolist()
    head = head_from_target(target_model, target_ids, config["eagle_aux_hidden_state_layer_ids"],
                            config.get("norm_before_residual", False))
    head.load_state_dict({name: t.float() if t.is_floating_point() else t for name, t in tensors.items()})
    head.trained_draft_steps = config.get(TRAINED_STEPS_FIELD, 0)
    return head


def head_shape(directory: Path) -> dict:
    """A saved head's shape for its card: what it reads, what it drafts, and its own weights."""
    config = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / WEIGHTS_FILE)
    return {"layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
            "parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
            "aux_layers": config["eagle_aux_hidden_state_layer_ids"],
            "norm_before_residual": config["norm_before_residual"],
            "vocab_size": config["vocab_size"], "draft_vocab_size": config["draft_vocab_size"],
            "trimmed_vocabulary": "d2t" in tensors, "ttt_steps": config[TRAINED_STEPS_FIELD]}
