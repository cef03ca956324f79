"""Per-prompt units: the independent observations every interval resamples.

Pairing is by prompt and in time: each request of an arm is matched to the
reference arm's request for the same prompt, in the same load regime, that
started nearest in time (so slow drift of the machine cancels in the ratio).
A prompt that an arm answered more than once contributes the mean of its log
ratios, so each prompt counts once. The baseline against itself pairs each
prompt's second baseline request with its first.

Under load the runner alternates arms in time blocks; each arm walks the
prompts in the same order, so arms share the prompts both reached before the
bound. Where they share too few, `prompt_logs` gives the per-prompt units for
an unpaired comparison.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

KEY = ["regime", "prompt_id"]
PAIR_COLUMNS = KEY + ["request_id", "t_start", "tpot_s", "e2e_s", "output_hash", "output_hash_kind", "temperature"]


def paired_requests(ok: pd.DataFrame, arm: str, reference: str) -> pd.DataFrame:
    """One row per request of `arm` that has a partner; reference columns end in `_ref`."""
    if arm == reference:
        ranked = ok[ok["arm"] == arm][PAIR_COLUMNS].copy()
        ranked["rank"] = ranked.groupby(KEY).cumcount()  # ok is sorted by start time
        later, first = ranked[ranked["rank"] == 1], ranked[ranked["rank"] == 0]
        pairs = later.drop(columns="rank").merge(first.drop(columns="rank"), on=KEY, suffixes=("", "_ref"))
    else:
        pairs = ok[ok["arm"] == arm][PAIR_COLUMNS].merge(
            ok[ok["arm"] == reference][PAIR_COLUMNS], on=KEY, suffixes=("", "_ref"))
    pairs["gap_s"] = (pairs["t_start"] - pairs["t_start_ref"]).abs()
    pairs = pairs.sort_values(["request_id", "gap_s", "request_id_ref"], kind="mergesort")
    return pairs.drop_duplicates("request_id").sort_values(["t_start", "request_id"], kind="mergesort")


def _log_ratio(reference: pd.Series, value: pd.Series) -> pd.Series:
    valid = (reference > 0) & (value > 0)
    return np.log(reference.where(valid) / value.where(valid))


def speed_units(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: mean log(reference / arm) of TPOT and of end-to-end time
    (positive = the arm is faster), the median time gap, and whether the
    output hash equals the reference's (on the prompt's first pair)."""
    frame = pairs.assign(
        log_tpot=_log_ratio(pairs["tpot_s_ref"], pairs["tpot_s"]),
        log_e2e=_log_ratio(pairs["e2e_s_ref"], pairs["e2e_s"]),
        comparable=pairs["output_hash"].notna() & pairs["output_hash_ref"].notna()
        & (pairs["output_hash_kind"] == pairs["output_hash_kind_ref"])
        & (pairs["temperature"].fillna(0) == 0) & (pairs["temperature_ref"].fillna(0) == 0),
        identical=pairs["output_hash"] == pairs["output_hash_ref"],
    )
    grouped = frame.groupby(KEY, sort=True)
    return pd.DataFrame({
        "log_tpot": grouped["log_tpot"].mean(),
        "log_e2e": grouped["log_e2e"].mean(),
        "gap_s": grouped["gap_s"].median(),
        "comparable": grouped["comparable"].first(),
        "identical": grouped["identical"].first(),
    }).reset_index()


def prompt_logs(ok: pd.DataFrame, arm: str) -> pd.DataFrame:
    """Per prompt an arm answered: the mean log TPOT and log end-to-end time
    (the units of an unpaired comparison)."""
    rows = ok[ok["arm"] == arm]
    frame = rows[KEY].assign(log_tpot=np.log(rows["tpot_s"].where(rows["tpot_s"] > 0)),
                             log_e2e=np.log(rows["e2e_s"].where(rows["e2e_s"] > 0)))
    return frame.groupby(KEY, sort=True)[["log_tpot", "log_e2e"]].mean().reset_index()


def acceptance_units(ok: pd.DataFrame, arm: str) -> pd.DataFrame:
    """Per prompt: summed drafts, drafted and accepted tokens, per-position
    accepted counts, how many requests carried spec metrics, and the decode
    tokens and steps of those requests.

    Decode tokens are the output tokens after the first (which the prefill
    produces), the tokens TPOT is measured over; every decode step emits one
    target token plus the drafts it accepted, so steps = tokens - accepted."""
    rows = ok[ok["arm"] == arm]
    with_metrics = rows["spec_drafts"].notna() & rows["completion_tokens"].notna()
    decode_tokens = (rows["completion_tokens"] - 1).clip(lower=0).where(with_metrics, 0)
    accepted = rows["spec_accepted_tokens"].fillna(0)
    width = max((len(v) for v in rows["accepted_per_pos"]), default=0)
    padded = np.array([v + [0] * (width - len(v)) for v in rows["accepted_per_pos"]], dtype=float).reshape(-1, width)
    frame = pd.DataFrame({
        "regime": rows["regime"].to_numpy(), "prompt_id": rows["prompt_id"].to_numpy(),
        "drafts": rows["spec_drafts"].fillna(0).to_numpy(),
        "draft_tokens": rows["spec_draft_tokens"].fillna(0).to_numpy(),
        "accepted": accepted.to_numpy(),
        "with_metrics": with_metrics.to_numpy(),
        "decode_tokens": decode_tokens.to_numpy(),
        # At least one step per drafted request: vLLM may count drafts accepted past max_tokens.
        "decode_steps": (decode_tokens - accepted).clip(lower=1).where(with_metrics, 0).to_numpy(),
    })
    for i in range(width):
        frame[f"pos{i}"] = padded[:, i]
    return frame.groupby(KEY, sort=True).sum().reset_index()


def position_counts(units: pd.DataFrame) -> np.ndarray:
    columns = sorted((c for c in units.columns if c.startswith("pos")), key=lambda c: int(c[3:]))
    return units[columns].to_numpy(dtype=float)
