"""The one seeded, stratified shuffle behind balanced subsets and held-out splits."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def stratified_shuffle(keys: Sequence[Hashable], seed: int) -> dict[Hashable, np.ndarray]:
    """Indices of each group of equal key, each group shuffled; groups drawn in sorted key order
    from one generator seeded with ``seed``, so the result depends only on the keys and the seed."""
    keys = list(keys)
    rng = np.random.default_rng(seed)
    groups = {}
    for key in sorted(set(keys)):
        idx = np.flatnonzero(np.fromiter((k == key for k in keys), dtype=bool, count=len(keys)))
        rng.shuffle(idx)
        groups[key] = idx
    return groups
