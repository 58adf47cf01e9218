"""Glue from data to a probe: the one place that decides where a surgery's probe comes from."""

from __future__ import annotations

import datetime
import logging
import platform
from importlib import metadata as importlib_metadata
from typing import Sequence

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
    labels = list(data.labels)
    if not labels:
        raise SurgeryError(f"probe data is empty ({data.description})")
    counts = (labels.count(0), labels.count(1))
    if min(counts) == 0:
        raise SurgeryError(f"probe data has a single class ({counts[0]} acceptable, {counts[1]} undesired); it needs both")
    features = hidden_features(model, tokenizer, data.texts, layer, pooling, feature_batch_size, max_length, progress)
    if min(counts) < MIN_PER_CLASS_FOR_CLASSIFIER:
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


def probe_for_request(model: nn.Module, tokenizer, requests: Sequence[dict], hparams: SurgeryHyperParams,
                      data_dir=None, progress: bool = False) -> Probe:
    """``hparams.probe_path`` when set; else a probe from the requests' texts plus ``hparams.probe_data``."""
    if hparams.probe_path:
        return Probe.load(hparams.probe_path, model)
    parts = [requests_to_data(requests)] if requests else []
    if hparams.probe_data:
        parts.append(load_behavior_data(hparams.probe_data, data_dir, hparams.probe_max_per_class, hparams.seed))
    if not parts:
        raise SurgeryError("no probe: set probe_path or probe_data in the hparams, or pass requests with target_new/ground_truth")
    data = BehaviorData(
        [t for p in parts for t in p.texts], [l for p in parts for l in p.labels], " + ".join(p.description for p in parts)
    )
    probe, _ = make_probe(model, tokenizer, data, hparams.probe_layer, hparams.pooling, training_from_hparams(hparams),
                          hparams.feature_batch_size, hparams.max_length, progress)
    return probe
