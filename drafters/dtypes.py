"""A served dtype's name (the config's `target.dtype`) as torch's type: one map for saving and replaying."""
from __future__ import annotations

import torch

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def saved_dtype(name: str) -> torch.dtype:
    """The dtype a drafter or head is saved in; "auto" saves float32, the dtype it trains in."""
    return TORCH_DTYPES.get(name, torch.float32)


def loaded_dtype(name: str) -> torch.dtype | str:
    """The dtype to load a model in for inference; "auto" keeps the checkpoint's own."""
    return TORCH_DTYPES.get(name, "auto")


def dtype_name(dtype: torch.dtype) -> str:
    """torch's dtype as a config or card writes it: "bfloat16", not "torch.bfloat16"."""
    return str(dtype).removeprefix("torch.")
