"""Torch dtypes by the names users type (``--dtype bf16``), one table for loading and streaming."""

from __future__ import annotations

import torch

from ..errors import SurgeryError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError) as err:
        raise SurgeryError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}") from err
