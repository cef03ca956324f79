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


def ratio(estimate: dict | None, digits: int = 2) -> str:
    """A geometric mean with its interval: '1.12× [0.98, 1.25]'."""
    if not estimate or estimate.get("value") is None:
        return DASH
    interval = estimate.get("ci")
    return f"{estimate['value']:.{digits}f}×" + (f" {ci(interval, digits)}" if interval else "")


def share(entry: dict | None) -> str:
    if not entry or not entry.get("compared"):
        return DASH
    return f"{entry['identical']}/{entry['compared']} ({100 * entry['share']:.0f}%)"


def percent(value) -> str:
    return DASH if value is None else f"{value:+.1f}%"
