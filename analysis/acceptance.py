"""Acceptance statistics and the analytic model of Leviathan et al. (2023).

Definitions (counts summed over the requests of a cell):
  D = drafts (vLLM num_spec_steps: decode steps that carried a draft),
  T = drafted tokens, A = accepted tokens, a_i = drafts whose position i
  (0-based) was accepted, N = decode tokens (output tokens after the first)
  and S = N - A decode steps (each emits one target token plus its accepted
  drafts).

  tau            = 1 + A / D       vLLM's mean acceptance length: tokens per
                                   step that carried a draft
  tokens_per_step = N / S          tokens per decode step, drafted or not; it
                                   is what TPOT divides (TPOT = step time / it)
  drafting_share f = D / S         steps that carried a draft (about 1 for a
                                   draft model; n-gram lookup drafts only when
                                   the context repeats)
  vllm_rate      = A / T           vLLM's "draft acceptance rate": every drafted
                                   position counts, also those after the first
                                   rejection, so with per-token agreement p and
                                   K = 3 it is (p + p^2 + p^3) / 3
  position_rate  = a_i / D         share of drafts whose position i was accepted
  conditional_i  = a_i / a_(i-1)   P(position i accepted | position i-1 accepted),
                                   a_(-1) = D
  alpha          = sum_i a_i / (D + sum_(i<K-1) a_i)
                                   Leviathan's per-token acceptance alpha, the
                                   maximum-likelihood value from the per-position
                                   counts (successes over positions tried)
  alpha_from_tau = the alpha with (1 - alpha^(K+1)) / (1 - alpha) = tau

The analytic model takes alpha, gamma = K, and c = the draft/target cost ratio
per drafted token:
  expected tokens per drafting step  E = (1 - alpha^(gamma+1)) / (1 - alpha)
  expected speed-up                  E / (gamma * c + 1)
so acceptance (E) and cost (1 / (gamma c + 1)) enter as separate factors.
Where not every step drafts (f < 1) the same model, step by step, gives
  (f E + 1 - f) / (g c + 1),   g = T / S drafted tokens per decode step,
which is Leviathan's formula at f = 1, g = gamma.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    if alpha >= 1:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def leviathan_speedup(alpha: float, gamma: int, cost_ratio: float, drafting_share: float = 1.0,
                      drafted_per_step: float | None = None) -> float:
    """Expected speed-up; with the defaults, Leviathan et al.'s formula."""
    drafted = gamma * drafting_share if drafted_per_step is None else drafted_per_step
    tokens = drafting_share * expected_tokens_per_step(alpha, gamma) + 1 - drafting_share
    return tokens / (drafted * cost_ratio + 1)


def alpha_from_tau(tau: float, k: int) -> float:
    """Invert tau = (1 - alpha^(K+1)) / (1 - alpha), which rises from 1 to K+1 on [0, 1]."""
    if tau <= 1:
        return 0.0
    if tau >= k + 1:
        return 1.0
    return float(brentq(lambda a: expected_tokens_per_step(a, k) - tau, 0.0, 1.0, xtol=1e-12))


def cost_ratio_from_speedup(tokens_per_step: float, speedup: float, drafted_per_step: float) -> float:
    """c from TPOT_spec = TPOT_base (g c + 1) / tokens_per_step, i.e.
    speedup = tokens_per_step / (g c + 1), g = drafted tokens per decode step."""
    return (tokens_per_step / speedup - 1) / drafted_per_step


def summarize(drafts: float, draft_tokens: float, accepted: float, per_position, k: int | None,
              decode_tokens: float = 0, decode_steps: float = 0) -> dict:
    """Acceptance figures for one cell; None where a count needed is zero or missing."""
    per_position = np.asarray(per_position, dtype=float)
    result = {
        "drafts": int(drafts), "draft_tokens": int(draft_tokens), "accepted_tokens": int(accepted),
        "tau": None, "vllm_rate": None, "mean_draft_length": None,
        "tokens_per_step": decode_tokens / decode_steps if decode_steps > 0 else None,
        "drafting_share": min(1.0, drafts / decode_steps) if decode_steps > 0 else None,
        "drafted_per_step": draft_tokens / decode_steps if decode_steps > 0 else None,
        "position_rate": [], "conditional": [], "alpha": None, "alpha_from_tau": None,
    }
    if drafts <= 0:
        return result
    result["tau"] = 1 + accepted / drafts
    result["mean_draft_length"] = draft_tokens / drafts
    if draft_tokens > 0:
        result["vllm_rate"] = accepted / draft_tokens
    if per_position.size:
        result["position_rate"] = (per_position / drafts).tolist()
        tried = np.concatenate([[drafts], per_position[:-1]])
        result["conditional"] = [a / t if t > 0 else None for a, t in zip(per_position, tried)]
        result["alpha"] = float(per_position.sum() / tried.sum())
    if k:
        result["alpha_from_tau"] = alpha_from_tau(result["tau"], k)
    return result
