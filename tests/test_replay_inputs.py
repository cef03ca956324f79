"""Unit tests of the replay's inputs: where a served output ends, how far the
targets are extended, which drafters are replayed, the replay settings."""

from __future__ import annotations

import pytest

from core.config import ReplayConfig
from core.contracts import token_ids_hash
from drafters.replay import MAX_EXTEND, extension, replayed_drafters
from drafters.responses import Request, missing_requests, served_length

STOP = {2, 7}


@pytest.mark.parametrize("output, max_tokens, expected", [
    ([5, 6, 2, 9, 9], 4, (3, "stop")),      # the stop token is part of the output
    ([5, 6, 8, 9, 9, 2], 4, (4, "length")),  # a stop past the budget does not count
    ([7, 6, 8], 3, (1, "stop")),            # every configured stop id ends it
    ([5, 6], 4, (2, "length")),             # the context ended generation early
    ([5, 6, 8, 9, 2], 4, (4, "length")),
])
def test_served_length_stops_at_the_first_stop_token_within_the_budget(output, max_tokens, expected):
    assert served_length(output, max_tokens, STOP) == expected


def test_a_cached_response_for_another_budget_is_regenerated():
    request = Request("t:1", [1, 2, 3], max_tokens=8)
    cached = {"t:1": {"prompt_sha": request.prompt_sha, "max_tokens": 16}}
    assert missing_requests([request], cached) == [request]
    cached["t:1"]["max_tokens"] = 8
    assert missing_requests([request], cached) == []
    del cached["t:1"]["max_tokens"]  # lines written before budgets were recorded stay valid
    assert missing_requests([request], cached) == []


def test_targets_extend_by_the_largest_k_replayed_or_served(default_config):
    config = default_config.model_copy(deep=True)
    config.replay = ReplayConfig(k=[1, 2])
    assert extension(config) == max(2, *(a.speculative.num_speculative_tokens for a in config.arms if a.speculative))
    config.replay = ReplayConfig(k=[16])
    assert extension(config) == MAX_EXTEND


def test_each_draft_model_drafter_is_replayed_once_and_ngram_needs_none(default_config):
    names = [a.name for a in default_config.arms]
    replay_only = [d.name for d in default_config.drafters if d.name not in ("generic", "finetuned")]
    assert replay_only, "the default's drafter matrix has drafters that no arm serves"
    # The served arms' drafters first, then the matrix's replay-only drafters, each once.
    assert replayed_drafters(default_config, names) == ["generic", "finetuned", *replay_only]
    # An arm left out of the run does not take its drafter along; replay-only drafters stay.
    assert replayed_drafters(default_config, ["baseline", "ngram"]) == replay_only


def test_token_id_hash_is_compact_json():
    import hashlib

    assert token_ids_hash([1, 2, 3]) == hashlib.sha256(b"[1,2,3]").hexdigest()


def test_replay_k_must_be_valid_speculative_lengths():
    assert ReplayConfig(k=[3, 1, 3]).k == [1, 3]
    for bad in ([], [0], [17]):
        with pytest.raises(ValueError, match="replay.k"):
            ReplayConfig(k=bad)
