"""The acceptance replay of EAGLE-3 heads: the chain over per-depth match vectors
(analysis/chain.py eagle3_trace), the parallel unrolled pass that computes them
(drafters/replay_eagle3.py) against a literal autoregressive drafting loop with
its own KV cache on a tiny random head and target, and the cache and analysis
around them (drafters/replay.py, analysis/replayed.py)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from analysis import chain
from analysis.chain import Trace, draft_model_trace, eagle3_trace
from core.paths import drafter_dir
from drafters import replay, replay_eagle3
from drafters.card import CARD_FORMAT
from drafters.eagle3 import head_from_target, target_features

VOCAB, HIDDEN, LAYERS = 64, 16, 8
KEPT = list(range(0, VOCAB, 2))  # a trimmed draft vocabulary: the even target ids
DEPTHS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: torch's thread pool only costs time here, and more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the chain over depth vectors ------------------------------------------------------------

def _shifted(match: list[bool], depths: int) -> list[list[bool]]:
    """A draft model's chain as depth vectors: its depth-j draft at c is its match at c + j."""
    return [[c + j < len(match) and match[c + j] for c in range(len(match))] for j in range(depths)]


def test_depth_vectors_that_shift_a_match_vector_give_the_draft_models_trace_at_every_k():
    rng = np.random.default_rng(0)
    for case in range(300):
        n = int(rng.integers(1, 40))
        match = (rng.random(n) < rng.choice([0.2, 0.6, 0.95])).tolist()
        output = rng.integers(0, 3, n).tolist()  # token 0 now and then: rule 6's zero drafts may be accepted
        prompt = int(rng.integers(1, 20))
        # Roomy, or tight enough that drafts are cut and steps send zero drafts (rules 2 and 6).
        limit = int(rng.choice([1000, prompt + n - int(rng.integers(0, 6))]))
        limit = max(limit, prompt + 1)
        for k in range(1, 6):
            served = int(rng.integers(1, max(2, n - k + 1)))
            kwargs = dict(prompt_tokens=prompt, max_model_len=limit, output_ids=output)
            try:
                expected = draft_model_trace(match, served, k, **kwargs)
            except ValueError as err:  # a draft past the known positions: the head's chain says the same
                with pytest.raises(ValueError, match="positions are known"):
                    eagle3_trace(_shifted(match, k), served, k, **kwargs)
                assert "positions are known" in str(err)
                continue
            assert eagle3_trace(_shifted(match, k + 2), served, k, **kwargs) == expected, (case, k)


def test_a_later_depth_fails_where_a_draft_models_shifted_match_would_pass():
    #              0  1  2  3  4  5  6  7  8  9
    match = [bool(m) for m in (0, 1, 1, 1, 1, 1, 1, 1, 1, 1)]
    output = list(range(10, 20))
    depth = _shifted(match, 3)
    # The head's second draft of the step at c = 1 misses (its own features led it astray),
    # though a draft model matching at 1, 2, 3 would have drafted three hits there.
    depth[1][1] = False
    # And at c = 3 the third draft misses.
    depth[2][3] = False
    kwargs = dict(prompt_tokens=5, max_model_len=1000, output_ids=output)
    assert draft_model_trace(match, 7, 3, **kwargs) == Trace(drafted=(3, 3), accepted=(3, 3), decode_steps=2)
    # c=1: depth 0 hits, depth 1 misses -> 1 accepted, produced 3; c=3: depths 0, 1 hit, 2 misses -> 2, produced 6;
    # c=6: all hit -> 3, produced 10 >= 7.
    head = eagle3_trace(depth, 7, 3, **kwargs)
    assert head == Trace(drafted=(3, 3, 3), accepted=(1, 2, 3), decode_steps=3)
    assert head.per_position(3) == [3, 2, 1]
    # At K = 1 only depth 0 is judged: the same as the draft model.
    assert eagle3_trace(depth, 7, 1, **kwargs) == draft_model_trace(match, 7, 1, **kwargs)
    # A later depth's hit after a miss is never judged.
    depth[2][1] = True
    assert eagle3_trace(depth, 7, 3, **kwargs) == head
    with pytest.raises(ValueError, match="needs 4 draft depths"):
        eagle3_trace(depth, 7, 4, **kwargs)


def test_zero_drafts_of_a_head_are_judged_against_the_output():
    # max_model_len = prompt + 6: from c = 3 on the step does not fit (prompt + c + K > limit), so the
    # runner sends K zero drafts, accepted where the target's token is 0.
    output = [5, 6, 7, 0, 0, 9, 9, 9]
    depth = [[True] * 8, [True] * 8]
    t = eagle3_trace(depth, 6, 2, prompt_tokens=4, max_model_len=10, output_ids=output)
    assert t == draft_model_trace([True] * 8, 6, 2, prompt_tokens=4, max_model_len=10, output_ids=output)


# --- depth vectors from a tiny head: the unrolled pass against literal drafting ----------------------

def _target():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32,
                                        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=256)).eval()


def _head(target, target_ids, norm_before_residual=False):
    head = head_from_target(target, target_ids, norm_before_residual=norm_before_residual)
    torch.manual_seed(1)
    # Weights far from the tiny init, so that argmaxes are not near-ties a rounding could flip.
    for module in head.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.4)
    return head.eval()


@torch.no_grad()
def _literal_drafts(head, features: torch.Tensor, sequence: list[int], anchor: int, depths: int) -> list[int]:
    """vLLM's drafting at one anchor, one step at a time with a KV cache of its own: step 0 over
    positions 0..anchor (the target's features there, the tokens one on), then single-token steps at
    anchor + j that read the step before's pre-norm output and its own draft. Target ids."""
    layer = head.layers[0]
    attn = layer.self_attn
    cache_k, cache_v = [], []

    def step(hidden, tokens, positions):
        if hidden.shape[-1] == head.fc.in_features:
            hidden = head.fc(hidden)
        normed = layer.hidden_norm(hidden)
        residual = normed if layer.norm_before_residual else hidden
        x = torch.cat([layer.input_layernorm(head.embed(tokens)), normed], dim=-1)[None]
        length = x.shape[1]

        def split(t, n):
            return t.view(1, length, n, attn.head_dim).transpose(1, 2)

        cos, sin = head.rotary(x, positions[None])
        q, k = apply_rotary_pos_emb(split(attn.q_proj(x), attn.heads), split(attn.k_proj(x), attn.kv_heads), cos, sin)
        cache_k.append(k)
        cache_v.append(split(attn.v_proj(x), attn.kv_heads))
        keys = torch.cat(cache_k, dim=2).repeat_interleave(attn.heads // attn.kv_heads, dim=1)
        values = torch.cat(cache_v, dim=2).repeat_interleave(attn.heads // attn.kv_heads, dim=1)
        slots = keys.shape[2]
        # The new queries fill the cache's last slots; each sees every slot up to its own.
        seen = torch.arange(slots)[None, :] <= (slots - length + torch.arange(length))[:, None]
        scores = (q @ keys.transpose(-1, -2)) * attn.head_dim ** -0.5
        out = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1) @ values
        residual = residual + attn.o_proj(out.transpose(1, 2).reshape(1, length, -1))[0]
        prenorm = residual + layer.mlp(layer.post_attention_layernorm(residual))
        return head.norm(prenorm) @ head.lm_head.weight.T, prenorm

    def to_target(draft_id: int) -> int:
        return draft_id if head.target_ids is None else head.target_ids[draft_id]

    logits, prenorm = step(features[:anchor + 1], torch.tensor(sequence[1:anchor + 2]), torch.arange(anchor + 1))
    drafts = [to_target(int(logits[-1].argmax()))]
    for j in range(1, depths):
        logits, prenorm = step(prenorm[-1:], torch.tensor(drafts[-1:]), torch.tensor([anchor + j]))
        drafts.append(to_target(int(logits[-1].argmax())))
    return drafts


def _features(head, target, sequence):
    return target_features(target, torch.tensor([sequence]), None, head.aux_layer_ids, logits=False)[0][0]


def _decoded(head, target, prompt: list[int], n: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """A target output on which the head's chain is known: each speculative step accepts a chosen number m
    of the head's literal drafts, then the target's token differs from the next draft. (output, the m's)."""
    output, planted = [rng.randrange(VOCAB)], []
    while len(output) < n:
        sequence = prompt + output
        drafts = _literal_drafts(head, _features(head, target, sequence), sequence, len(sequence) - 2, DEPTHS)
        m = rng.choice([0, 1, 2, 3, 3])
        planted.append(m)
        output += drafts[:m] + [rng.choice([t for t in range(VOCAB) if m == DEPTHS or t != drafts[m]])]
    return output[:n], planted


@pytest.mark.parametrize("trimmed, norm_before_residual", [(True, False), (False, True)])
def test_the_unrolled_pass_equals_literal_drafting_at_every_position_and_k(trimmed, norm_before_residual,
                                                                         monkeypatch):
    target = _target()
    head = _head(target, KEPT if trimmed else None, norm_before_residual)
    rng = random.Random(2)
    targets, planted = [], {}
    for i in range(4):
        prompt = [rng.randrange(3, VOCAB) for _ in range(2 + 2 * i)]
        output, ms = _decoded(head, target, prompt, 16 + 4 * i, rng)
        targets.append({"id": f"p{i}", "prompt_ids": prompt, "output_ids": output})
        planted[f"p{i}"] = ms

    # Batches of several padded rows (batch_tokens), through the replay's own entry point.
    monkeypatch.setattr(replay_eagle3, "load_models", lambda config, directory, device: (target, head))
    config = SimpleNamespace(replay=SimpleNamespace(batch_tokens=80))
    assert len(replay.length_batches(targets, 80)) > 1
    lines = {line["id"]: line for line in replay_eagle3.head_matches(config, None, targets, DEPTHS,
                                                                      progress=lambda m: None)}

    judged = leading_hits = 0
    for t in targets:
        prompt, output, n = t["prompt_ids"], t["output_ids"], len(t["output_ids"])
        line = lines[t["id"]]
        depth = line["depth_match"]
        assert len(depth) == DEPTHS and all(len(d) == n for d in depth) and line["match"] == depth[0]
        assert all(d[0] == "0" for d in depth)  # output[0] is the prefill's
        assert line["in_vocab"] == "".join("1" if not trimmed or o in KEPT else "0" for o in output)
        sequence = prompt + output
        features = _features(head, target, sequence)
        literal = {}
        for c in range(1, n):
            drafts = _literal_drafts(head, features, sequence, len(prompt) + c - 2, DEPTHS)
            literal[c] = drafts
            hits = [c + j < n and drafts[j] == output[c + j] for j in range(DEPTHS)]
            leading = next((j for j, h in enumerate(hits) if not h), DEPTHS)
            # Every depth the chain judges at c: the leading hits and the first miss.
            for j in range(min(leading + 1, DEPTHS)):
                assert depth[j][c] == ("1" if hits[j] else "0"), (t["id"], c, j, drafts, output[c:c + DEPTHS])
                judged += 1
            leading_hits += leading

        # The chain itself at every K: from the depth vectors, and served literally with the head's own drafts.
        for k in range(1, DEPTHS + 1):
            served = n - k
            for limit in (1000, len(prompt) + n - 2):
                kwargs = dict(prompt_tokens=len(prompt), max_model_len=limit)
                replayed = eagle3_trace([[ch == "1" for ch in d] for d in depth], served, k, output_ids=output,
                                        **kwargs)
                literally = chain._replay(served_tokens=served, k=k, propose=lambda c: literal[c][:k],
                                          is_accepted=lambda p, token: output[p] == token, known_positions=n,
                                          **kwargs)
                assert replayed == literally, (t["id"], k, limit)
        # The planted acceptance counts, at the K the output was decoded with.
        trace = eagle3_trace([[ch == "1" for ch in d] for d in depth], n - DEPTHS, DEPTHS,
                             prompt_tokens=len(prompt), max_model_len=1000, output_ids=output)
        assert list(trace.accepted) == planted[t["id"]][:trace.drafts]
    assert judged > 100 and leading_hits > 40  # deeper depths were judged on hits, not only first misses


@torch.no_grad()
def test_a_head_served_in_bfloat16_keeps_float32_rotary_frequencies_and_drafts():
    target = _target()
    head = _head(target, KEPT)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    first = torch.tensor([3, 2])
    full = replay_eagle3.head_drafts(head, target, ids, mask, first, DEPTHS)
    # As the replay loads them: the target in bf16, the head sharing its embedding, then cast.
    target = _target().to(torch.bfloat16)
    head = replay_eagle3.served_head(_head(target, KEPT), torch.bfloat16)
    half = replay_eagle3.head_drafts(head, target, ids, mask, first, DEPTHS)
    assert head.fc.weight.dtype == torch.bfloat16 and head.rotary.inv_freq.dtype == torch.float32
    # Drafted where step j reads a real token, from the first anchor on; -1 elsewhere, in both dtypes.
    for drafts in (full, half):
        assert ((drafts >= 0) == (full >= 0)).all()
        assert (drafts[0, 0, 3:11] >= 0).all() and (drafts[0, 0, :3] == -1).all() and drafts[0, 0, 11] == -1
        assert (drafts[1, 2, 2:5] >= 0).all() and (drafts[1, 2, 5:] == -1).all()
        assert set(drafts[drafts >= 0].tolist()) <= set(KEPT)


# --- the cache, the replayed drafters, the analysis ---------------------------------------------------

def test_a_heads_lines_carry_depth_vectors_and_are_recomputed_for_more_depths(default_config, tmp_path, monkeypatch):
    config = default_config.model_copy(deep=True)
    config.cache_dir = str(tmp_path / "cache")
    directory = drafter_dir(config, "generic")
    directory.mkdir(parents=True)
    (directory / "drafter_card.json").write_text(json.dumps({"format": CARD_FORMAT, "kind": "eagle3",
                                                             "inputs_hash": "ab" * 32}))
    targets = [{"id": "a", "prompt_ids": [1, 2], "output_ids": [3, 4, 5]},
               {"id": "b", "prompt_ids": [1], "output_ids": [6, 7]}]
    calls = []

    def fake(config, directory, todo, depths, progress):
        calls.append(([t["id"] for t in todo], depths))
        for t in todo:
            strings = ["0" + "1" * (len(t["output_ids"]) - 1)] * depths
            yield {"id": t["id"], "key": replay.target_key(t), "match": strings[0],
                   "in_vocab": "1" * len(t["output_ids"]), "depth_match": strings}

    monkeypatch.setattr(replay_eagle3, "head_matches", fake)
    depths = replay.extension(config)
    lines = replay.drafter_matches(config, "generic", targets, progress=lambda m: None)
    assert calls == [(["a", "b"], depths)]
    assert lines[0] == {"drafter": "generic", "id": "a", "match": "011", "in_vocab": "111",
                        "depth_match": ["011"] * depths}
    replay.drafter_matches(config, "generic", targets, progress=lambda m: None)
    assert len(calls) == 1  # cached
    config.replay = config.replay.model_copy(update={"k": [depths + 1]})
    replay.drafter_matches(config, "generic", targets, progress=lambda m: None)
    assert calls[-1] == (["a", "b"], depths + 1)  # the cached lines hold too few depths


def test_eagle3_arms_drafters_are_replayed(default_config):
    config = default_config.model_copy(deep=True)
    arm = next(a for a in config.arms if a.speculative and a.speculative.drafter == "finetuned")
    arm.speculative = arm.speculative.model_copy(update={"method": "eagle3"})
    names = [a.name for a in config.arms]
    assert replay.replayed_drafters(config, names) == replay.replayed_drafters(default_config, names)
    assert "finetuned" in replay.replayed_drafters(config, [arm.name])


def test_an_eagle3_arm_whose_depths_shift_its_matches_is_analysed_as_the_draft_model_arm(tmp_path):
    from analysis import replayed
    from analysis.rundir import load_run
    from test_analysis_synthetic import REPLAY_K, write_synthetic_run

    def replay_of(run):
        """The finetuned arm's part of the replay section (its tau table alone: the table's intervals are slow)."""
        units = replayed.prompt_units(run)
        own = {key: frame for key, frame in units.items() if key[0] == "finetuned"}
        return {"arms": [(a.name, a.method) for a in replayed.replayed_arms(run)],
                "units": {k: f.to_dict("list") for k, f in own.items()},
                "acceptance": replayed._acceptance(run, own), "finetune": replayed._finetune(run, units),
                "validation": replayed._validation(run, units, None)["arms"]["finetuned"],
                "profiles": replayed._profiles(run)["finetuned"]}

    run_dir = write_synthetic_run(tmp_path / "run", replay=True, dtype="float32")
    before = replay_of(load_run(run_dir))

    config_path = run_dir / "config.resolved.yaml"
    config = yaml.safe_load(config_path.read_text())
    for arm in config["arms"]:
        if arm["name"] == "finetuned":
            arm["speculative"]["method"] = "eagle3"
    config_path.write_text(yaml.safe_dump(config))
    matches = run_dir / "replay" / "matches.jsonl"
    rows = [json.loads(line) for line in matches.read_text().splitlines()]
    for row in rows:
        if row["drafter"] == "finetuned":
            bits = [c == "1" for c in row["match"]]
            row["depth_match"] = ["".join("1" if b else "0" for b in d) for d in _shifted(bits, max(REPLAY_K))]
    matches.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = load_run(run_dir)
    assert set(run.replay.depth_matches) == {"finetuned"}
    after = replay_of(run)

    assert ("finetuned", "eagle3") in after["arms"] and ("finetuned", "draft_model") in before["arms"]
    for part in ("units", "acceptance", "finetune", "validation", "profiles"):
        assert after[part] == before[part], part
    assert after["acceptance"] and after["finetune"] and any(r["oov_share"] is not None for r in after["acceptance"])
    assert after["validation"]["verdict"] == "agrees" and after["validation"]["n"] > 0
