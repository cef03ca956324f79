"""Acceptance statistics and the analytic model of Leviathan et al. (2023).

Definitions (counts summed over the requests of a cell):
  D = drafts (vLLM num_spec_steps), T = drafted tokens, A = accepted tokens,
  a_i = drafts whose position i (0-based) was accepted.

  tau            = 1 + A / D       mean tokens emitted per target step
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

The analytic model takes alpha, gamma = K drafted tokens per step and c = the
draft/target step-cost ratio:
  expected tokens per step  E = (1 - alpha^(gamma+1)) / (1 - alpha)
  expected speed-up         E / (gamma * c + 1)
so acceptance (E) and cost (1 / (gamma c + 1)) enter as separate factors.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    if alpha >= 1:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def leviathan_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    return expected_tokens_per_step(alpha, gamma) / (gamma * cost_ratio + 1)


def alpha_from_tau(tau: float, k: int) -> float:
    """Invert tau = (1 - alpha^(K+1)) / (1 - alpha), which rises from 1 to K+1 on [0, 1]."""
    if tau <= 1:
        return 0.0
    if tau >= k + 1:
        return 1.0
    return float(brentq(lambda a: expected_tokens_per_step(a, k) - tau, 0.0, 1.0, xtol=1e-12))


def cost_ratio_from_speedup(tau: float, speedup: float, gamma: int) -> float:
    """c from TPOT_spec = TPOT_base (gamma c + 1) / tau, i.e. speedup = tau / (gamma c + 1)."""
    return (tau / speedup - 1) / gamma


def summarize(drafts: float, draft_tokens: float, accepted: float, per_position, k: int | None) -> dict:
    """Acceptance figures for one cell; None where a count needed is zero or missing."""
    per_position = np.asarray(per_position, dtype=float)
    result = {
        "drafts": int(drafts), "draft_tokens": int(draft_tokens), "accepted_tokens": int(accepted),
        "tau": None, "vllm_rate": None, "mean_draft_length": None,
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
