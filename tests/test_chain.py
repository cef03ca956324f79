"""The chain replay (analysis/chain.py) on hand-built cases, and its n-gram
lookup against vLLM's own NgramProposer."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.chain import (
    Trace,
    draft_model_trace,
    ngram_propose,
    ngram_trace,
    summarize_traces,
)

PROMPT = 10
ROOMY = 1000  # a max_model_len that never binds


def trace(match, served, k, *, prompt=PROMPT, max_model_len=ROOMY, output_ids=None):
    return draft_model_trace(
        match, served, k, prompt_tokens=prompt, max_model_len=max_model_len, output_ids=output_ids
    )


# --- the draft-model chain on hand-built match vectors -----------------------


def test_all_match_accepts_every_draft_and_the_last_step_runs_past_the_end():
    # output[0] from the prefill; steps start at 1, 5, 9 (each 3 accepted + 1 target token).
    # The step at 9 drafts positions 9..11 although only position 9 is served.
    t = trace([True] * 14, served=10, k=3)
    assert t == Trace(drafted=(3, 3, 3), accepted=(3, 3, 3), decode_steps=3)
    assert t.tau == 4.0
    assert t.per_position(3) == [3, 3, 3]


def test_no_match_gives_one_token_per_step():
    t = trace([False] * 14, served=10, k=3)
    assert t == Trace(drafted=(3,) * 9, accepted=(0,) * 9, decode_steps=9)
    assert t.tau == 1.0
    assert t.per_position(3) == [0, 0, 0]


def test_alternating_matches_accept_one_then_reject():
    # m[t] true at odd t: steps start at 1, 3, 5, 7, 9; each accepts t, rejects t + 1.
    match = [t % 2 == 1 for t in range(14)]
    t = trace(match, served=10, k=3)
    assert t == Trace(drafted=(3,) * 5, accepted=(1,) * 5, decode_steps=5)
    assert t.per_position(3) == [5, 0, 0]


def test_mixed_pattern_hand_computed():
    #        0  1  2  3  4  5  6  7  8  9 10 11 12
    match = [0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0]
    # c=1: 1,2 match, 3 not -> a=2, c=4; c=4: 4 not -> a=0, c=5;
    # c=5: 5,6,7 all -> a=3, c=9; c=9: 9 yes, 10 no -> a=1, c=11 >= 11 stop.
    t = trace([bool(m) for m in match], served=11, k=3)
    assert t == Trace(drafted=(3, 3, 3, 3), accepted=(2, 0, 3, 1), decode_steps=4)
    assert t.per_position(3) == [3, 2, 1]
    assert t.tau == pytest.approx(1 + 6 / 4)


def test_stop_token_inside_a_draft_still_counts_the_accepted_tokens_after_it():
    # The stop token is output[5] (served_tokens = 6). The step at 5 drafts 5..7;
    # the ignore_eos extension says 6 and 7 match too, so vLLM counts 3 accepted
    # (num_accepted is taken before the stop check trims the tokens).
    extended_match = [True] * 10
    t = trace(extended_match, served=6, k=3)
    assert t == Trace(drafted=(3, 3), accepted=(3, 3), decode_steps=2)
    # Only what follows the stop token changes the count.
    cut_match = [True] * 6 + [False] * 4
    assert trace(cut_match, served=6, k=3).accepted == (3, 1)


def test_max_tokens_inside_a_draft_counts_past_max_tokens():
    # max_tokens = 7: the step at 5 drafts positions 5, 6, 7; 7 lies past max_tokens
    # and is still counted; nothing cuts drafts at max_tokens.
    t = trace([True] * 11, served=7, k=3)
    assert t == Trace(drafted=(3, 3), accepted=(3, 3), decode_steps=2)


def test_k_larger_than_the_remaining_tokens():
    # 4 tokens served, K = 8: one step drafts all 8 (positions 1..8).
    t = trace([True] * 12, served=4, k=8)
    assert t == Trace(drafted=(8,), accepted=(8,), decode_steps=1)
    assert t.per_position(8) == [1] * 8
    # A rejection inside the long draft ends the step there: 1, 2 accepted, the
    # target adds 3; the next step (at 4) drafts 4..11.
    assert trace([True, True, True, False] + [True] * 8, served=5, k=8).accepted == (2, 8)


def test_a_draft_judged_past_the_known_output_is_an_error():
    with pytest.raises(ValueError, match="extend the target output"):
        trace([True] * 6, served=4, k=8)


def test_a_single_served_token_has_no_decode_step():
    t = trace([True] * 5, served=1, k=3)
    assert t == Trace(drafted=(), accepted=(), decode_steps=0)
    assert t.tau is None
    assert t.per_position(3) == [0, 0, 0]


def test_max_model_len_cuts_drafts_and_then_sends_zero_drafts():
    # prompt 10, max_model_len 20, K 3, nothing matches. Scheduled drafts are cut
    # to max_model_len - (prompt + c) - 1. The drafter runs only while
    # prompt + c + drafts_scheduled + K <= 20; after that the runner sends K zeros:
    #   c : 1  2  3  4  5 | 6  7  8 | 9
    #   S : 3  3  3  3  3 | 3  2  1 | 0 (plain decode step)
    #   seq len after the step (10 + c + S): 14 15 16 17 18 -> 18 + 3 > 20: zeros from c=6
    t = trace([False] * 14, served=10, k=3, max_model_len=20)
    assert t == Trace(drafted=(3, 3, 3, 3, 3, 3, 2, 1), accepted=(0,) * 8, decode_steps=9)
    # A zero draft is accepted only where the target's token is 0: at c=6 one is,
    # so c=8 follows, with room for 20 - 18 - 1 = 1 draft.
    output = [5] * 14
    output[6] = 0
    t = trace([False] * 14, served=10, k=3, max_model_len=20, output_ids=output)
    assert t.drafted == (3, 3, 3, 3, 3, 3, 1) and t.accepted == (0, 0, 0, 0, 0, 1, 0)
    assert t.decode_steps == 8


def test_max_model_len_when_everything_matches():
    # c=1: S 3 (seq 14), c=5: S 3 (seq 18), c=9: 18 + 3 > 20 -> zeros, and no room
    # is left anyway (20 - 19 - 1 = 0): a plain decode step ends the request at 10.
    t = trace([True] * 14, served=10, k=3, max_model_len=20)
    assert t == Trace(drafted=(3, 3), accepted=(3, 3), decode_steps=3)
    # served_tokens beyond max_model_len - prompt stop at max_model_len all the same.
    assert trace([True] * 14, served=12, k=3, max_model_len=20) == t


def test_a_prompt_too_long_for_k_drafts_starts_with_zero_drafts():
    # prompt 10 + K 3 > 12: the prefill step does not fit, so step 1 carries zeros,
    # cut to 12 - 11 - 1 = 0: no speculative step at all.
    t = trace([True] * 6, served=2, k=3, max_model_len=12)
    assert t == Trace(drafted=(), accepted=(), decode_steps=1)


def test_summarize_traces_sums_counts_and_takes_tau_over_all_steps():
    a = Trace(drafted=(3, 3), accepted=(3, 1), decode_steps=2)
    b = Trace(drafted=(2,), accepted=(0,), decode_steps=4)
    assert summarize_traces([a, b], k=3) == {
        "drafts": 3,
        "draft_tokens": 8,
        "accepted_tokens": 4,
        "decode_steps": 6,
        "per_position": [2, 1, 1],
        "tau": pytest.approx(1 + 4 / 3),
    }
    assert summarize_traces([], k=2)["tau"] is None


# --- n-gram lookup ------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "k", "min_n", "max_n", "max_model_len", "expected"),
    [
        # The longest suffix n-gram (1 2 3) occurs at 0: draft what follows it.
        ([1, 2, 3, 4, 1, 2, 3], 3, 1, 3, 100, [4, 1, 2]),
        # A match near the end: fewer than k tokens follow -> a truncated draft.
        ([9, 1, 2, 1, 2], 4, 1, 3, 100, [1, 2]),
        # The suffix may overlap its occurrence; one token still follows it.
        ([5, 5, 5, 5], 3, 1, 3, 100, [5]),
        # Of several occurrences of the longest n-gram, the earliest wins.
        ([1, 2, 7, 1, 2, 8, 1, 2], 3, 1, 2, 100, [7, 1, 2]),
        # A longer n-gram beats an earlier shorter one ...
        ([2, 3, 5, 1, 2, 3, 6, 1, 2, 3], 3, 1, 3, 100, [6, 1, 2]),
        # ... unless max_n caps it: then the earliest "2 3" wins.
        ([2, 3, 5, 1, 2, 3, 6, 1, 2, 3], 3, 1, 2, 100, [5, 1, 2]),
        # No earlier occurrence of any suffix n-gram: no draft.
        ([1, 2, 3, 4], 3, 1, 3, 100, []),
        # Only a 1-gram matches but min_n is 2: no draft.
        ([1, 2, 3, 1], 3, 2, 3, 100, []),
        # Context shorter than min_n: no draft.
        ([7, 7], 3, 3, 4, 100, []),
        # max_model_len leaves room for one token only, then for none.
        ([1, 2, 3, 4, 1, 2, 3], 3, 1, 3, 8, [4]),
        ([1, 2, 3, 4, 1, 2, 3], 3, 1, 3, 7, []),
    ],
)
def test_ngram_propose_hand_built(context, k, min_n, max_n, max_model_len, expected):
    assert ngram_propose(context, k, min_n, max_n, max_model_len) == expected


@pytest.fixture(scope="module")
def vllm_ngram():
    """propose(context, k, min_n, max_n, max_model_len) through vLLM's NgramProposer."""
    module = pytest.importorskip("vllm.v1.spec_decode.ngram_proposer")

    def propose(context, k, min_n, max_n, max_model_len):
        # __init__ wants a whole VllmConfig; set what propose() reads instead.
        proposer = object.__new__(module.NgramProposer)
        proposer.min_n, proposer.max_n, proposer.k = min_n, max_n, k
        proposer.max_model_len = max_model_len
        proposer.valid_ngram_draft = np.zeros((1, k), dtype=np.int32)
        proposer.valid_ngram_num_drafts = np.zeros(1, dtype=np.int32)
        proposer.num_tokens_threshold = 8192
        proposer.num_numba_thread_available = 1
        token_ids = np.zeros((1, max(len(context), max_model_len)), dtype=np.int32)
        token_ids[0, : len(context)] = context
        num_tokens = np.array([len(context)], dtype=np.int32)
        # One request that has just sampled a token.
        return proposer.propose(k, [[int(context[-1])]], num_tokens, token_ids)[0]

    return propose


# vLLM's numba kernel takes a reflected list, which numba plans to deprecate.
numba_list_warning = pytest.mark.filterwarnings(r"ignore:\s*Encountered the use of a type")


@numba_list_warning
@pytest.mark.parametrize(
    ("k", "min_n", "max_n"), [(1, 1, 1), (2, 1, 3), (3, 2, 4), (4, 1, 5), (4, 3, 3), (2, 2, 8)]
)
def test_ngram_propose_equals_vllm_on_random_sequences(vllm_ngram, k, min_n, max_n):
    rng = np.random.default_rng(1000 * k + 10 * min_n + max_n)
    found = truncated = 0
    for _ in range(300):
        length = int(rng.integers(1, 80))
        context = rng.integers(0, int(rng.integers(2, 6)), length).tolist()
        # Sometimes max_model_len binds: at, just past, or well past the context.
        max_model_len = int(rng.choice([length, length + 1, length + 2, 4 * length + 8]))
        expected = vllm_ngram(context, k, min_n, max_n, max_model_len)
        assert ngram_propose(context, k, min_n, max_n, max_model_len) == expected, (
            context,
            max_model_len,
        )
        found += bool(expected)
        truncated += 0 < len(expected) < k
    # The small alphabets make lookups succeed often, and truncate some.
    assert found > 100
    if k > 1:
        assert truncated > 0


@numba_list_warning
@pytest.mark.parametrize(
    "context",
    [
        [1, 2, 3, 4, 1, 2, 3],
        [9, 1, 2, 1, 2],
        [5, 5, 5, 5],
        [2, 3, 5, 1, 2, 3, 6, 1, 2, 3],
        [1, 2, 3, 4],
    ],
)
def test_ngram_propose_hand_built_cases_equal_vllm(vllm_ngram, context):
    for k, min_n, max_n in [(3, 1, 3), (4, 1, 2), (2, 2, 2)]:
        for max_model_len in (len(context), len(context) + 1, 100):
            assert ngram_propose(context, k, min_n, max_n, max_model_len) == vllm_ngram(
                context, k, min_n, max_n, max_model_len
            )


# --- the n-gram chain ------------------------------------------------------------


def test_ngram_trace_hand_computed():
    # sequence: prompt 7 1 2 3 4 | output 1 2 3 5 1 2 3 8, stop after output[5] (6 served).
    # c=1: context ...4 1; "4 1" never occurred, "1" first at 1 -> draft [2, 3];
    #      output[1:3] = 2 3: a=2, the target adds 5; c=4.
    # c=4: context ends "3 5": neither "3 5" nor "5" occurred -> no draft, plain step; c=5.
    # c=5: context ends "5 1": "1" first at 1 -> [2, 3] vs output[5:7] = 2 3: a=2,
    #      although output[6] lies past the stop; c=8.
    t = ngram_trace(
        [7, 1, 2, 3, 4], [1, 2, 3, 5, 1, 2, 3, 8], 6, 2, min_n=1, max_n=2, max_model_len=100
    )
    assert t == Trace(drafted=(2, 2), accepted=(2, 2), decode_steps=3)
    assert t.tau == 3.0
    # K = 3: the drafts are [2, 3, 4] twice; the 4 is rejected both times.
    t3 = ngram_trace(
        [7, 1, 2, 3, 4], [1, 2, 3, 5, 1, 2, 3, 8], 6, 3, min_n=1, max_n=2, max_model_len=100
    )
    assert t3 == Trace(drafted=(3, 3), accepted=(2, 2), decode_steps=3)
    assert t3.per_position(3) == [2, 2, 0]


def test_ngram_trace_truncated_drafts():
    # prompt 4 6 | output 6 6 6 6 6 6 6 6, 6 served, K = 3, n in [1, 2].
    # c=1: context 4 6 6; "6 6" has no earlier occurrence, "6" first at 1 -> only
    #      one token follows: draft [6]; a=1; c=3.
    # c=3: context 4 6 6 6 6; "6 6" first at 1..2 -> [6, 6] (two follow); a=2; c=6.
    t = ngram_trace([4, 6], [6] * 8, 6, 3, min_n=1, max_n=2, max_model_len=100)
    assert t == Trace(drafted=(1, 2), accepted=(1, 2), decode_steps=2)


def test_ngram_trace_at_max_model_len():
    # max_model_len 6 with a 2-token prompt: at most 4 output tokens.
    # c=1: the prefill (2) + K (3) fits; lookup k = min(3, 6 - 3) -> [6]; a=1; seq 2+1+1=4.
    # c=3: 4 + 3 > 6 -> zero drafts, and no room (6 - 5 - 1 = 0): a plain step; c=4.
    t = ngram_trace([4, 6], [6] * 8, 8, 3, min_n=1, max_n=2, max_model_len=6)
    assert t == Trace(drafted=(1,), accepted=(1,), decode_steps=2)
