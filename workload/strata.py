"""Length strata: bins over prompt length, and optionally over expected output
length, named so that a label says its own range.

Labels (see docs/formats.md): `p{lo}-{hi}` for prompt length in [lo, hi)
tokens, `p{lo}+` for the last, open bin. With output strata the label is
`p{lo}-{hi}.o{lo}-{hi}` (the output bin named the same way, with `o`).

Edges are the lower bounds of the bins and start at 0. The defaults are
log-spaced (powers of 4): a 135M model's prompts run from a few dozen to a
couple of thousand tokens, and speculation's gain changes with the order of
magnitude of the context, not with its last digits.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

DEFAULT_PROMPT_EDGES = (0, 64, 256, 1024)
DEFAULT_OUTPUT_EDGES = (0, 32, 128, 512)


class StrataError(ValueError):
    """Edges that cannot define bins."""


def check_edges(edges: Sequence[int], what: str = "edges") -> list[int]:
    edges = [int(e) for e in edges]
    if not edges or edges[0] != 0:
        raise StrataError(f"{what} must start at 0, got {edges}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise StrataError(f"{what} must increase strictly, got {edges}")
    return edges


def log_spaced_edges(first: int, factor: int, bins: int) -> list[int]:
    """[0, first, first*factor, ...] with `bins` bins in all; the default
    prompt edges are log_spaced_edges(64, 4, 4)."""
    if first < 1 or factor < 2 or bins < 1:
        raise StrataError("need first >= 1, factor >= 2, bins >= 1")
    return [0] + [first * factor**i for i in range(bins - 1)]


def bin_label(prefix: str, edges: Sequence[int], value: int) -> str:
    """The label of the bin of `edges` that holds `value`."""
    index = bisect.bisect_right(edges, value) - 1
    if index < 0:
        raise StrataError(f"length {value} is below the first edge {edges[0]}")
    lo = edges[index]
    return f"{prefix}{lo}+" if index == len(edges) - 1 else f"{prefix}{lo}-{edges[index + 1]}"


def bin_labels(prefix: str, edges: Sequence[int]) -> list[str]:
    return [bin_label(prefix, edges, lo) for lo in edges]


def stratum(prompt_tokens: int, prompt_edges: Sequence[int],
            output_tokens: int | None = None, output_edges: Sequence[int] | None = None) -> str:
    """The stratum label of one request."""
    label = bin_label("p", prompt_edges, prompt_tokens)
    if output_edges:
        if output_tokens is None:
            raise StrataError("output strata need an expected output length")
        label += "." + bin_label("o", output_edges, output_tokens)
    return label


def all_strata(prompt_edges: Sequence[int], output_edges: Sequence[int] | None = None) -> list[str]:
    """Every label these edges can produce, in order."""
    prompt = bin_labels("p", prompt_edges)
    if not output_edges:
        return prompt
    return [f"{p}.{o}" for p in prompt for o in bin_labels("o", output_edges)]
