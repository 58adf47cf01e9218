"""The one batching helper: length-sorted batches (little padding) and padding by hand.

Every loop that runs a model over many texts (probe features, generation, perplexity, KL, the
judges) batches through :func:`length_sorted_batches`; the ones that build token tensors
themselves pad with :func:`pad` so the tokenizer's own padding settings are never changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

Side = Literal["left", "right"]


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, desc: str = "batches", progress: bool = True
) -> Iterator[list[int]]:
    """Index lists of at most ``batch_size`` items, shortest first (a stable sort: ties keep input order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) <= 1, unit="batch"):
        yield order[start : start + batch_size]


def pad(sequences: Sequence[Sequence[int]], pad_id: int, side: Side) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape (len(sequences), longest), padded on ``side``."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (decoder-only tokenizers often have no pad token)."""
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else tokenizer.eos_token_id
