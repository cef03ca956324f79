"""Real vLLM-CPU arms answer correctly, and speculation changes nothing at temperature 0 in float32."""

import httpx
import pytest

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat(url: str, arm: str, messages, max_tokens: int = 24) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": arm, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
    })
    response.raise_for_status()
    return response.json()


def test_baseline_knows_paris(real_arms):
    answer = chat(real_arms["baseline"], "baseline", QUESTION)
    assert "Paris" in answer["choices"][0]["message"]["content"]


def test_ngram_drafts_and_matches_baseline(real_arms):
    # A prompt that repeats itself gives the n-gram drafter something to look up.
    messages = [{"role": "user", "content": "Repeat this sentence three times: the quick brown fox "
                 "jumps over the lazy dog. What is the capital of France?"}]
    spec = chat(real_arms["ngram"], "ngram", messages, max_tokens=48)
    base = chat(real_arms["baseline"], "baseline", messages, max_tokens=48)
    stats = spec["metrics"]["speculative_decoding"]
    assert stats["num_draft_tokens"] > 0
    assert spec["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]


def test_capital_question_identical_across_arms(real_arms):
    outputs = {arm: chat(url, arm, QUESTION)["choices"][0]["message"]["content"] for arm, url in real_arms.items()}
    assert "Paris" in outputs["ngram"]
    assert outputs["ngram"] == outputs["baseline"]
