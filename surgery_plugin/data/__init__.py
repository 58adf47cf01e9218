"""Behavior data: local files under the data folder first, the public hub copies as a fallback."""

from .loaders import (
    BehaviorData,
    load_advbench,
    load_behavior_data,
    load_benign_documents,
    load_benign_texts,
    load_davidson,
    load_hh_rlhf,
    load_rtp,
    load_safeedit,
    load_sst2,
    load_toxigen_demonstrations,
    load_toxigen_prompts,
)
from .paths import resolve_data_dir

__all__ = [
    "BehaviorData",
    "load_advbench",
    "load_behavior_data",
    "load_benign_documents",
    "load_benign_texts",
    "load_davidson",
    "load_hh_rlhf",
    "load_rtp",
    "load_safeedit",
    "load_sst2",
    "load_toxigen_demonstrations",
    "load_toxigen_prompts",
    "resolve_data_dir",
]
