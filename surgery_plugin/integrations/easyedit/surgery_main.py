"""Model Surgery as an EasyEdit algorithm: ``apply_surgery_to_model`` and the request -> probe path.

EasyEdit's method folders hold ``<method>_hparams.py`` and ``<method>_main.py``; this is the
``_main``. The hyperparameters are :class:`surgery_plugin.config.SurgeryHyperParams` (the same
object the CLI reads). Importing this module never imports EasyEdit.

Probes: with ``hparams.probe_path`` the saved probe is used. Otherwise the probe is built from
the requests' texts (``prompt + target_new`` acceptable, ``prompt + ground_truth`` undesired)
plus ``hparams.probe_data``, through :func:`surgery_plugin.pipeline.build_edit` like every other edit.
Pooled features are cached per model weights (:class:`~surgery_plugin.pipeline.EditCache` keyed by every
parameter's bytes): EasyEdit edits request after request on restored weights, so a restored model hits
the cache and an edited one (sequential editing) misses it.
"""

from __future__ import annotations

import copy as copy_module
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...config import SurgeryHyperParams
from ...core.edit import apply_edit
from ...core.probe import Probe
from ...core.provenance import model_fingerprint
from ...pipeline import EditCache, build_edit, build_probe

logger = logging.getLogger(__name__)

# a few text sets' pooled states of a few weight versions: EasyEdit restores the weights between requests
_CACHE_ENTRIES = 8
_cache = EditCache(fingerprint=model_fingerprint, max_entries=_CACHE_ENTRIES)


def clear_probe_cache() -> None:
    """Forget every cached feature matrix and probe."""
    global _cache
    _cache = EditCache(fingerprint=model_fingerprint, max_entries=_CACHE_ENTRIES)


def probe_cache_info() -> dict[str, int]:
    """Pooled-state entries held, and how many lookups hit and missed."""
    return {"entries": len(_cache._states), "hits": _cache.hits, "misses": _cache.misses}


def probe_for_request(
    model: nn.Module,
    tokenizer,
    requests: Sequence[dict],
    hparams: SurgeryHyperParams,
    data_dir=None,
    progress: bool = False,
) -> Probe:
    """``hparams.probe_path`` when set; else a probe from the requests' texts plus ``hparams.probe_data``."""
    if hparams.probe_path:
        return Probe.load(hparams.probe_path, model)
    return build_probe(
        model, tokenizer, hparams, requests=requests, cache=_cache, data_dir=data_dir, progress=progress
    )[0]


def apply_surgery_to_model(
    model: nn.Module,
    tok,
    requests: Sequence[dict] | None,
    hparams: SurgeryHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """EasyEdit's ``apply_*_to_model`` contract: edit ``model`` (or a deep copy) and return it.

    ``keep_original_weight`` and EasyEdit's extra arguments (``train_ds``) are accepted and
    unused: surgery always edits the given (or copied) model and, with ``return_orig_weights``,
    reports the originals through ``weights_copy``, which is how EasyEdit restores the model
    between non-sequential edits.
    """
    if copy:
        model = copy_module.deepcopy(model)
    _, _, edit = build_edit(
        model,
        tok,
        hparams,
        requests=requests or [],
        cache=_cache,
        data_dir=kwargs.get("data_dir"),
        progress=kwargs.get("progress", False),
    )
    weights_copy = apply_edit(model, edit, return_orig_weights=return_orig_weights)
    logger.info(
        "surgery edited %d gate rows in %d layers (alpha %s)", edit.regions.num_rows, len(edit.layers), hparams.alpha
    )
    return model, weights_copy
