"""The cell vocabulary every part of the analysis shares.

A cell is one (arm, load regime, task, stratum); `ALL` in the task place
pools every task but the length-matched controls, in the stratum place the
task's strata. The answer's fits are keyed by (gain, divergence measure,
length kind); HEADLINE is the one the answer is stated in.
"""

from __future__ import annotations

ALL = "all"
CELL_KEY = ("arm", "regime", "task", "stratum")  # the fields of a cell that name it
HEADLINE = ("js", "total")  # the divergence the answer is stated in, chosen before looking at data
# What the fine-tuned drafter gains over the generic one, and the words for it.
GAINS = {"log_speed_ratio": "log speed-up gain", "tau_gain": "τ gain"}
_FIT_JOIN = "|"


def cell_key(arm: str, regime: str | None, task: str = ALL, stratum: str = ALL) -> tuple:
    return arm, regime, task, stratum


def find_cell(cells: list[dict], arm: str, regime: str | None, task: str = ALL, stratum: str = ALL) -> dict | None:
    """The cell (a results.json dict) of one scope, or None."""
    key = cell_key(arm, regime, task, stratum)
    return next((c for c in cells if tuple(c[field] for field in CELL_KEY) == key), None)


def fit_key(gain: str, measure: str, kind: str) -> str:
    """The key of one fit in an answer's `fits`: 'tau_gain|js|total'."""
    return _FIT_JOIN.join((gain, measure, kind))


def fit_key_parts(key: str) -> tuple[str, str, str]:
    gain, measure, kind = key.split(_FIT_JOIN)
    return gain, measure, kind
