"""Glue from data to a probe: the one place that decides where a surgery's probe comes from."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import platform
from collections import OrderedDict
from importlib import metadata as importlib_metadata
from typing import Iterator, Sequence

import torch
from torch import nn

from .data import BehaviorData, load_behavior_data
from .errors import SurgeryError
from .hparams import SurgeryHyperParams
from .models import model_name
from .probe import Probe, ProbeTraining, check_labels, difference_of_means, hidden_features, resolve_layer, train_probe

logger = logging.getLogger(__name__)

# below this many examples of either class a classifier's held-out numbers mean nothing
MIN_PER_CLASS_FOR_CLASSIFIER = 16


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("surgery_plugin", "torch", "transformers", "peft", "safetensors"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def make_probe(
    model: nn.Module,
    tokenizer,
    data: BehaviorData,
    layer: int = -1,
    pooling: str = "mean",
    training: ProbeTraining = ProbeTraining(),
    feature_batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> tuple[Probe, dict]:
    """Features of ``data`` at ``layer`` -> trained probe with its provenance in ``probe.metadata``."""
    _check_both_classes(data)
    features = hidden_features(model, tokenizer, data.texts, layer, pooling, feature_batch_size, max_length, progress)
    return probe_from_features(model, data, features, layer, pooling, training, max_length, progress)


def _check_both_classes(data: BehaviorData) -> None:
    labels = list(data.labels)
    if not labels:
        raise SurgeryError(f"probe data is empty ({data.description})")
    counts = (labels.count(0), labels.count(1))
    if min(counts) == 0:
        raise SurgeryError(f"probe data has a single class ({counts[0]} acceptable, {counts[1]} undesired); it needs both")


def probe_from_features(model: nn.Module, data: BehaviorData, features: torch.Tensor, layer: int, pooling: str,
                        training: ProbeTraining, max_length: int, progress: bool = False) -> tuple[Probe, dict]:
    """Train (or, with too few examples, difference-of-means) a probe on precomputed features."""
    _check_both_classes(data)
    labels = list(data.labels)
    if min(labels.count(0), labels.count(1)) < MIN_PER_CLASS_FOR_CLASSIFIER:
        probe = difference_of_means(features, labels)
        nan = float("nan")
        metrics = {"method": "difference_of_means", "n_train": len(labels), "n_test": 0, "test_accuracy": nan, "test_auc": nan}
    else:
        check_labels(labels)
        probe, metrics = train_probe(features, labels, training, progress)
        metrics["method"] = "linear_softmax"
    probe.metadata = {
        "model": model_name(model),
        "layer": resolve_layer(model, layer),
        "layer_requested": layer,
        "pooling": pooling,
        "hidden_size": probe.hidden_size,
        "data": data.description,
        "seed": training.seed,
        "training": {"epochs": training.epochs, "lr": training.lr, "batch_size": training.batch_size,
                     "test_fraction": training.test_fraction, "weight_decay": training.weight_decay},
        "max_length": max_length,
        "versions": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metrics,
    }
    logger.info("probe at layer %s: held-out accuracy %.4f, AUC %.4f", probe.metadata["layer"], metrics["test_accuracy"], metrics["test_auc"])
    return probe, metrics


def training_from_hparams(hparams: SurgeryHyperParams) -> ProbeTraining:
    return ProbeTraining(epochs=hparams.probe_epochs, lr=hparams.probe_lr, batch_size=hparams.probe_batch_size,
                         test_fraction=hparams.probe_test_fraction, seed=hparams.seed)


def requests_to_data(requests: Sequence[dict]) -> BehaviorData:
    """EasyEdit requests: ``prompt`` + ``target_new`` is acceptable (0), ``prompt`` + ``ground_truth`` undesired (1)."""
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


def model_fingerprint(model: nn.Module) -> str | None:
    """A digest of every parameter's name, shape, dtype, device and values; None when values are not visible.

    CPU tensors are hashed byte for byte. Elsewhere (GPU) the values enter as float64 sum and
    sum of squares computed on the device, which any surgery changes, instead of copying
    every weight to the host.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        if param.device.type == "meta":  # offloaded: the weights are not here to fingerprint
            return None
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{param.device}".encode())
        data = param.detach()
        if data.device.type == "cpu":
            digest.update(memoryview(data.contiguous().view(torch.uint8).numpy()))
        else:
            moments = torch.stack([data.sum(dtype=torch.float64), data.double().square().sum()])
            digest.update(moments.cpu().numpy().tobytes())
    return digest.hexdigest()


def _texts_digest(texts: Sequence[str], labels: Sequence[int]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for text, label in zip(texts, labels):
        digest.update(f"{label}\x00{text}\x01".encode())
    return digest.hexdigest()


def _tokenizer_id(tok) -> tuple:
    size = len(tok) if hasattr(tok, "__len__") else getattr(tok, "vocab_size", None)
    return type(tok).__name__, str(getattr(tok, "name_or_path", "")), size


# Features of ``probe_data`` are the slow part of a request-driven edit (minutes on a CPU) and do
# not depend on the request: EasyEdit edits request after request on restored weights, so they
# are cached per (weights, texts, settings). An edited model (sequential editing) misses.
_feature_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_cache_stats = {"hits": 0, "misses": 0}
_FEATURE_CACHE_SIZE = 4


def clear_probe_cache() -> None:
    """Forget every cached ``probe_data`` feature matrix."""
    _feature_cache.clear()
    _cache_stats.update(hits=0, misses=0)


def probe_cache_info() -> dict[str, int]:
    return {"entries": len(_feature_cache), **_cache_stats}


def _probe_data_features(model: nn.Module, tok, data: BehaviorData, hparams: SurgeryHyperParams, progress: bool) -> torch.Tensor:
    fingerprint = model_fingerprint(model)
    key = (fingerprint, _texts_digest(data.texts, data.labels), _tokenizer_id(tok), hparams.probe_layer,
           hparams.pooling, hparams.max_length, hparams.feature_batch_size)
    if fingerprint is not None and key in _feature_cache:
        _cache_stats["hits"] += 1
        _feature_cache.move_to_end(key)
        logger.info("probe data features: cache hit (%d texts)", len(data.texts))
        return _feature_cache[key]
    _cache_stats["misses"] += 1
    features = hidden_features(model, tok, data.texts, hparams.probe_layer, hparams.pooling,
                               hparams.feature_batch_size, hparams.max_length, progress)
    if fingerprint is not None:
        _feature_cache[key] = features
        while len(_feature_cache) > _FEATURE_CACHE_SIZE:
            _feature_cache.popitem(last=False)
    return features


@contextlib.contextmanager
def _keep_text_end(tok) -> Iterator[None]:
    """Truncate from the left: a request text is prompt + answer, and the answer is what differs.

    SafeEdit's adversarial prompts run to 400+ tokens; cut from the right at ``max_length`` the
    safe and unsafe texts of a request would become the same prompt prefix.
    """
    side = getattr(tok, "truncation_side", None)
    if side is None:
        yield
        return
    tok.truncation_side = "left"
    try:
        yield
    finally:
        tok.truncation_side = side


def probe_for_request(model: nn.Module, tokenizer, requests: Sequence[dict], hparams: SurgeryHyperParams,
                      data_dir=None, progress: bool = False) -> Probe:
    """``hparams.probe_path`` when set; else a probe from the requests' texts plus ``hparams.probe_data``."""
    if hparams.probe_path:
        return Probe.load(hparams.probe_path, model)
    parts: list[tuple[BehaviorData, torch.Tensor]] = []
    request_data = requests_to_data(requests) if requests else None
    if request_data is not None and request_data.texts:
        with _keep_text_end(tokenizer):
            features = hidden_features(model, tokenizer, request_data.texts, hparams.probe_layer, hparams.pooling,
                                       hparams.feature_batch_size, hparams.max_length, progress)
        parts.append((request_data, features))
    if hparams.probe_data:
        data = load_behavior_data(hparams.probe_data, data_dir, hparams.probe_max_per_class, hparams.seed)
        parts.append((data, _probe_data_features(model, tokenizer, data, hparams, progress)))
    if not parts:
        raise SurgeryError("no probe: set probe_path or probe_data in the hparams, or pass requests with target_new/ground_truth")
    data = BehaviorData([t for d, _ in parts for t in d.texts], [l for d, _ in parts for l in d.labels],
                        " + ".join(d.description for d, _ in parts))
    probe, _ = probe_from_features(model, data, torch.cat([f for _, f in parts]), hparams.probe_layer, hparams.pooling,
                                   training_from_hparams(hparams), hparams.max_length, progress)
    return probe
