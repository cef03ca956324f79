"""Replay of greedy speculative decoding, step by step, as vLLM 0.32 (CPU) runs it.

At temperature 0 a draft token is accepted exactly when it equals the target's
greedy token at its position, so the whole served chain follows from the
target's greedy output and, per drafter, what it would propose. Paths below are
under vllm/ (0.32.0); the rules, in the order a request meets them:

1. First token from the prefill. The prefill step samples output[0] and carries
   no draft; the drafter then proposes for the step after it (draft models,
   EAGLE-3 heads and n-gram alike: the runner drafts after every step whose
   request has sampled, v1/worker/gpu_model_runner.py:4362-4489; only
   unfinished prefill chunks are skipped, v1/core/sched/scheduler.py:2560-2564).
2. Each step proposes K (a draft model or head always K; n-gram, see 7 and 8).
   The scheduler then cuts the drafts to what fits before max_model_len:
   num_new_tokens <= max_model_len - num_computed - 1 (scheduler.py:714-721), so
   with num_computed = prompt + c - 1 after c output tokens at most
   max_model_len - (prompt + c) - 1 drafts are scheduled (scheduler.py:861-872);
   none left means a plain decode step. Nothing cuts drafts at max_tokens.
3. Accept the leading matches; the target adds one token. The greedy rejection
   sampler keeps drafts up to the first mismatch, then writes the target's
   token (the recovered one, or the bonus after K matches)
   (v1/sample/rejection_sampler.py:762-781, CPU: the same rule in C++,
   vllm/utils/cpu_triton_utils.py:313).
4. Counting happens before the stop check. update_from_output takes
   accepted = len(generated) - 1 and observes it into the request's metrics
   (scheduler.py:2113-2149) before _update_request_with_output appends the
   tokens one by one and trims everything after the first stop
   (scheduler.py:2501-2510). Drafts accepted past the stop token or past
   max_tokens therefore still count.
5. The stop token, max_tokens and max_model_len all stop at the token that
   reaches them (v1/core/sched/utils.py:98-119). served_tokens is that output
   length; it is also capped here at max_model_len - prompt.
6. The next step starts after the target's token. The drafter runs only if the
   step just run "fits": its optimistic sequence length (prompt + c + drafts
   scheduled, as if all were accepted; gpu_model_runner.py:2037-2046) plus K is
   at most the drafter's max_model_len (gpu_model_runner.py:4288-4301,
   config/speculative.py:1633: min of the draft's and the target's; taken equal
   to the target's here). Otherwise the runner sends K drafts of token id 0
   (gpu_model_runner.py:4454-4464); they are scheduled, cut and counted like
   any others, and accepted only where the target's token is 0.
7. n-gram lookup (v1/spec_decode/ngram_proposer.py:209-295) over the whole
   context (prompt + output so far): no draft if the context is shorter than
   min_n (222-225); k is cut to max_model_len - len(context), no draft if that
   is <= 0 (227-230, also 158-161); the longest n in [min_n, max_n] whose n-gram
   ends the context and occurs earlier wins, and of its occurrences the
   earliest (263-265); the draft is the tokens after that occurrence, fewer
   than k when the context ends sooner (293-295); no occurrence of length
   >= min_n, no draft. An occurrence may overlap the suffix but must be
   followed by at least one token, so a found draft is never empty.
8. A step without drafts is still a decode step (it emits one token) but no
   speculative step: metrics count only steps that carried drafts
   (scheduler.py:2113).
9. Metrics (v1/metrics/stats.py:350-415, RequestSpecDecodeMetrics):
   num_spec_steps = steps with drafts, num_draft_tokens = drafts scheduled,
   acceptance_histogram[j] = steps with j accepted, num_accepted_draft_tokens =
   sum of j, mean_acceptance_length tau = 1 + accepted / steps.

Assumed and not replayed: one request in the batch at a time (the fit check in
6 takes the batch's longest sequence), no async scheduling (off on CPU,
platforms/cpu.py:330-331), no structured output, a static K. One edge case is
left out: a waiting request with exactly one token left to compute (a prompt
cached by prefix caching up to its last token, with prompt - 1 a multiple of
the block size) is padded to K placeholder drafts (-1), which adds a
speculative step with 0 accepted (scheduler.py:1131-1152, 1372-1375).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Drafts the runner sends when the step did not fit in the drafter (rule 6).
_ZERO_DRAFT_TOKEN = 0
# A stand-in for a head's draft that its depth vector rejects: no target token equals it.
_REJECTED_TOKEN = -1


@dataclass(frozen=True)
class Trace:
    """One request's speculative steps, as vLLM's per-request metrics count them."""

    drafted: tuple[int, ...]  # per speculative step: draft tokens scheduled
    accepted: tuple[int, ...]  # per speculative step: leading drafts accepted
    decode_steps: int  # all decode steps after the prefill, drafted or not

    @property
    def drafts(self) -> int:
        return len(self.drafted)

    @property
    def draft_tokens(self) -> int:
        return sum(self.drafted)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted)

    @property
    def tau(self) -> float | None:
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    def per_position(self, k: int) -> list[int]:
        """a_i: speculative steps whose draft position i (0-based) was accepted."""
        if self.drafted and max(self.drafted) > k:
            raise ValueError(f"steps drafted up to {max(self.drafted)} tokens, more than k={k}")
        return [sum(1 for a in self.accepted if a > i) for i in range(k)]


# A draft lists token ids, or None for "the drafter's own token", which the
# match vector judges.
Draft = list[int | None]


def _replay(
    *,
    served_tokens: int,
    k: int,
    prompt_tokens: int,
    max_model_len: int,
    propose: Callable[[int], Draft],
    is_accepted: Callable[[int, int | None], bool],
    known_positions: int,
) -> Trace:
    """The chain of rules 1-6. propose(c) drafts for output positions c, c+1, ...
    given the target's output[:c]; is_accepted(t, token) judges one draft token
    at output position t; known_positions bounds the positions that can be judged."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if prompt_tokens < 1 or prompt_tokens >= max_model_len:
        raise ValueError("need 1 <= prompt_tokens < max_model_len")
    if served_tokens < 1:
        raise ValueError("served_tokens must be at least 1 (the prefill's token)")
    end = min(served_tokens, max_model_len - prompt_tokens)

    drafted: list[int] = []
    accepted: list[int] = []
    decode_steps = 0
    produced = 1  # output[0] comes from the prefill
    last_seq_len = prompt_tokens  # the prefill step held the prompt
    while produced < end:
        if last_seq_len + k <= max_model_len:
            draft = propose(produced)
        else:
            draft = [_ZERO_DRAFT_TOKEN] * k
        room = max_model_len - (prompt_tokens + produced) - 1
        draft = draft[: max(room, 0)]

        leading = 0
        for token in draft:
            position = produced + leading
            if position >= known_positions:
                raise ValueError(
                    f"output position {position} is needed to judge a draft but only "
                    f"{known_positions} positions are known; extend the target output"
                )
            if not is_accepted(position, token):
                break
            leading += 1

        if draft:
            drafted.append(len(draft))
            accepted.append(leading)
        decode_steps += 1
        last_seq_len = prompt_tokens + produced + len(draft)
        produced += leading + 1
    return Trace(tuple(drafted), tuple(accepted), decode_steps)


def draft_model_trace(
    match: Sequence[bool],
    served_tokens: int,
    k: int,
    *,
    prompt_tokens: int,
    max_model_len: int,
    output_ids: Sequence[int] | None = None,
) -> Trace:
    """The trace of a draft-model drafter from its teacher-forced match vector.

    match[t] says whether the drafter's greedy token given prompt + output[:t]
    equals output[t]; only leading drafts are ever judged, and those follow the
    target's own prefix, so this is exact. output_ids judges the zero drafts of
    rule 6; without it they count as rejected (the target's token is not 0).
    """
    match = np.asarray(match, dtype=bool)
    known = len(match) if output_ids is None else min(len(match), len(output_ids))

    def is_accepted(position: int, token: int | None) -> bool:
        if token is None:
            return bool(match[position])
        return output_ids is not None and output_ids[position] == token

    return _replay(
        served_tokens=served_tokens,
        k=k,
        prompt_tokens=prompt_tokens,
        max_model_len=max_model_len,
        propose=lambda produced: [None] * k,
        is_accepted=is_accepted,
        known_positions=known,
    )


def eagle3_trace(
    depth_match: Sequence[Sequence[bool]],
    served_tokens: int,
    k: int,
    *,
    prompt_tokens: int,
    max_model_len: int,
    output_ids: Sequence[int],
) -> Trace:
    """The trace of an EAGLE-3 head from its per-depth match vectors.

    depth_match[j][c] says whether the head's depth-j draft of the step that
    starts at output position c (given prompt + output[:c], its own drafts
    before j taken as the target's tokens) equals output[c + j]. A head's
    drafts beyond the first read its own features, so unlike a draft model's
    they are not match[c + j]; with the target's tokens as their inputs they
    are exact wherever they are judged, since only leading drafts are. The
    zero drafts of rule 6 are judged against output_ids.
    """
    if len(depth_match) < k:
        raise ValueError(f"k={k} needs {k} draft depths, the head's vectors have {len(depth_match)}")
    depth_match = [np.asarray(d, dtype=bool) for d in depth_match[:k]]
    known = min(len(output_ids), *(len(d) for d in depth_match))

    def propose(produced: int) -> Draft:
        # The draft a matching depth proposes is the target's token; a rejected one, no token.
        return [int(output_ids[produced + j])
                if produced + j < known and depth_match[j][produced] else _REJECTED_TOKEN
                for j in range(k)]

    return _replay(
        served_tokens=served_tokens,
        k=k,
        prompt_tokens=prompt_tokens,
        max_model_len=max_model_len,
        propose=propose,
        is_accepted=lambda position, token: int(output_ids[position]) == token,
        known_positions=known,
    )


def ngram_propose(
    context: Sequence[int], k: int, min_n: int, max_n: int, max_model_len: int
) -> list[int]:
    """vLLM's prompt-lookup draft for one context (rule 7)."""
    tokens = np.asarray(context, dtype=np.int64)
    total = len(tokens)
    if total < min_n:
        return []
    k = min(k, max_model_len - total)
    if k <= 0:
        return []

    # Candidate occurrences end at e in [0, total - 2], so a token follows them.
    # length[e]: how many tokens ending at e agree with the context's suffix.
    candidates = total - 1
    length = np.zeros(candidates, dtype=np.int64)
    still_matching = np.ones(candidates, dtype=bool)
    suffix_token_matches = np.zeros(candidates, dtype=bool)
    for back in range(min(max_n, candidates)):
        suffix_token_matches[:] = False
        suffix_token_matches[back:] = tokens[: candidates - back] == tokens[total - 1 - back]
        still_matching &= suffix_token_matches
        if not still_matching.any():
            break
        length += still_matching
    longest = int(length.max()) if candidates else 0
    if longest < min_n:
        return []
    start = int(np.argmax(length == longest)) + 1  # the earliest occurrence
    return tokens[start : start + k].tolist()


def ngram_trace(
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    served_tokens: int,
    k: int,
    *,
    min_n: int,
    max_n: int,
    max_model_len: int,
) -> Trace:
    """The trace of vLLM's n-gram drafter over the target's own token sequence."""
    sequence = np.concatenate(
        [np.asarray(prompt_ids, dtype=np.int64), np.asarray(output_ids, dtype=np.int64)]
    )
    prompt_tokens = len(prompt_ids)

    def propose(produced: int) -> Draft:
        context = sequence[: prompt_tokens + produced]
        return ngram_propose(context, k, min_n, max_n, max_model_len)

    return _replay(
        served_tokens=served_tokens,
        k=k,
        prompt_tokens=prompt_tokens,
        max_model_len=max_model_len,
        propose=propose,
        is_accepted=lambda position, token: int(output_ids[position]) == token,
        known_positions=len(output_ids),
    )


def summarize_traces(traces: Iterable[Trace], k: int) -> dict:
    """Counts summed over traces, and tau = 1 + accepted / drafts (None without drafts)."""
    drafts = draft_tokens = accepted_tokens = decode_steps = 0
    per_position = [0] * k
    for trace in traces:
        drafts += trace.drafts
        draft_tokens += trace.draft_tokens
        accepted_tokens += trace.accepted_tokens
        decode_steps += trace.decode_steps
        per_position = [a + b for a, b in zip(per_position, trace.per_position(k))]
    return {
        "drafts": drafts,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted_tokens,
        "decode_steps": decode_steps,
        "per_position": per_position,
        "tau": 1 + accepted_tokens / drafts if drafts else None,
    }
