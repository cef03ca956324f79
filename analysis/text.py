"""How numbers are written in the report, the summary and `compare`."""

from __future__ import annotations

DASH = "–"  # a missing value


def num(value, digits: int = 3) -> str:
    if value is None:
        return DASH
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.{digits}f}"


def ci(interval, digits: int = 3) -> str:
    return DASH if not interval else f"[{num(interval[0], digits)}, {num(interval[1], digits)}]"


def with_ci(value, interval, digits: int = 3) -> str:
    """'1.234 [1.1, 1.3]'; the value alone without an interval, a dash without a value."""
    if value is None:
        return DASH
    return f"{num(value, digits)} {ci(interval, digits)}" if interval else num(value, digits)


def ratio(estimate, digits: int = 2) -> str:
    """A geometric mean with its interval, '1.12× [0.98, 1.25]', from an
    analysis.schema.Estimate (or None)."""
    if estimate is None or estimate.value is None:
        return DASH
    return f"{estimate.value:.{digits}f}×" + (f" {ci(estimate.ci, digits)}" if estimate.ci else "")


def share(entry) -> str:
    """'9/12 (75%)' from an analysis.schema.Share (or None)."""
    if entry is None or not entry.compared:
        return DASH
    return f"{entry.identical}/{entry.compared} ({100 * entry.share:.0f}%)"


def percent(value) -> str:
    return DASH if value is None else f"{value:+.1f}%"
