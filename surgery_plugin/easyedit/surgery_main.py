"""Model Surgery as an EasyEdit algorithm: ``apply_surgery_to_model`` and the request -> probe path.

EasyEdit's method folders hold ``<method>_hparams.py`` and ``<method>_main.py``; this is the
``_main``. The hyperparameters are :class:`surgery_plugin.hparams.SurgeryHyperParams` (the same
object the CLI reads). Importing this module never imports EasyEdit.

Probes: with ``hparams.probe_path`` the saved probe is used. Otherwise the probe is built from
the requests' texts (``prompt + target_new`` acceptable, ``prompt + ground_truth`` undesired)
plus ``hparams.probe_data``. The ``probe_data`` features are cached per model weights: EasyEdit
edits request after request on restored weights, so a restored model hits the cache and an
edited one (sequential editing) misses it.
"""

from __future__ import annotations

import copy as copy_module
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import BehaviorData, load_behavior_data
from ..data.loaders import join
from ..errors import SurgeryError
from ..hparams import SurgeryHyperParams
from ..probe import Probe, ProbeTraining, hidden_features, probe_from_features
from ..provenance import labeled_texts_sha256, model_fingerprint
from ..surgery import apply_edit, edit_from_hparams

logger = logging.getLogger(__name__)


def requests_to_data(requests: Sequence[dict]) -> BehaviorData:
    """EasyEdit requests: ``prompt + target_new`` is acceptable (0), ``prompt + ground_truth`` undesired (1)."""
    texts, labels = [], []
    for request in requests:
        prompt = str(request.get("prompt", ""))
        for key, label in (("target_new", 0), ("ground_truth", 1)):
            answers = request.get(key)
            for answer in answers if isinstance(answers, (list, tuple)) else [answers]:
                if answer:
                    texts.append(f"{prompt} {answer}".strip())
                    labels.append(label)
    return BehaviorData(texts, labels, f"easyedit_requests n={len(texts)}")


# Features of ``probe_data`` are the slow part of a request-driven edit (minutes on a CPU) and do
# not depend on the request: cached per (weights, texts, settings).
_feature_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_cache_stats = {"hits": 0, "misses": 0}
_FEATURE_CACHE_SIZE = 4


def clear_probe_cache() -> None:
    """Forget every cached ``probe_data`` feature matrix."""
    _feature_cache.clear()
    _cache_stats.update(hits=0, misses=0)


def probe_cache_info() -> dict[str, int]:
    return {"entries": len(_feature_cache), **_cache_stats}


def _tokenizer_id(tok) -> tuple:
    size = len(tok) if hasattr(tok, "__len__") else getattr(tok, "vocab_size", None)
    return type(tok).__name__, str(getattr(tok, "name_or_path", "")), size


def _probe_data_features(
    model: nn.Module, tok, data: BehaviorData, hparams: SurgeryHyperParams, progress: bool
) -> torch.Tensor:
    fingerprint = model_fingerprint(model)
    key = (
        fingerprint,
        labeled_texts_sha256(data.texts, data.labels, length=32),
        _tokenizer_id(tok),
        hparams.probe_layer,
        hparams.pooling,
        hparams.max_length,
        hparams.feature_batch_size,
    )
    if fingerprint is not None and key in _feature_cache:
        _cache_stats["hits"] += 1
        _feature_cache.move_to_end(key)
        logger.info("probe data features: cache hit (%d texts)", len(data.texts))
        return _feature_cache[key]
    _cache_stats["misses"] += 1
    features = hidden_features(
        model,
        tok,
        data.texts,
        hparams.probe_layer,
        hparams.pooling,
        hparams.feature_batch_size,
        hparams.max_length,
        progress,
    )
    if fingerprint is not None:
        _feature_cache[key] = features
        while len(_feature_cache) > _FEATURE_CACHE_SIZE:
            _feature_cache.popitem(last=False)
    return features


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
    parts: list[tuple[BehaviorData, torch.Tensor]] = []
    request_data = requests_to_data(requests) if requests else None
    if request_data is not None and request_data.texts:
        features = hidden_features(
            model,
            tokenizer,
            request_data.texts,
            hparams.probe_layer,
            hparams.pooling,
            hparams.feature_batch_size,
            hparams.max_length,
            progress,
        )
        parts.append((request_data, features))
    if hparams.probe_data:
        data = load_behavior_data(hparams.probe_data, data_dir, hparams.probe_max_per_class, hparams.seed)
        parts.append((data, _probe_data_features(model, tokenizer, data, hparams, progress)))
    if not parts:
        raise SurgeryError(
            "no probe: set probe_path or probe_data in the hparams, or pass requests with target_new/ground_truth"
        )
    data = join([d for d, _ in parts])
    probe, _ = probe_from_features(
        model,
        data,
        torch.cat([f for _, f in parts]),
        hparams.probe_layer,
        hparams.pooling,
        ProbeTraining.from_hparams(hparams),
        hparams.max_length,
        progress,
    )
    return probe


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
    probe = probe_for_request(
        model, tok, requests or [], hparams, data_dir=kwargs.get("data_dir"), progress=kwargs.get("progress", False)
    )
    # the probe's texts: the requests' and hparams.probe_data's; only gate_contrast reads them, and reading a
    # data set costs seconds per request
    data = requests_to_data(requests or [])
    if hparams.probe_data and hparams.region_scoring == "gate_contrast":
        more = load_behavior_data(
            hparams.probe_data, kwargs.get("data_dir"), hparams.probe_max_per_class, hparams.seed
        )
        data = join([data, more]) if data.texts else more
    # the variants beyond the paper (probe_project_out, gate_contrast) need statistics of benign text
    edit = edit_from_hparams(
        model, tok, probe, hparams, kwargs.get("data_dir"), data, progress=kwargs.get("progress", False)
    )
    weights_copy = apply_edit(model, edit, return_orig_weights=return_orig_weights)
    logger.info(
        "surgery edited %d gate rows in %d layers (alpha %s)", edit.regions.num_rows, len(edit.layers), hparams.alpha
    )
    return model, weights_copy
