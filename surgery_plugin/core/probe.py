"""Step 1 of Model Surgery: the behavior probe.

A 2-class linear head trained with softmax cross-entropy on pooled hidden states
(:mod:`.features`), as in the paper. The probe is ``v = W[1]``, the weight
row of the undesired class. The head starts at zero, so ``W[1] = -W[0]`` throughout training
(their gradients and Adam updates are exact negatives) and ``v`` is the discriminative direction
with no random-init component.

Probes are safetensors files; their header metadata records how they were made
(:func:`probe_from_features`: model, layer, pooling, data, training recipe, versions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import SurgeryHyperParams
from ..errors import SurgeryError
from ..io.files import is_temp_name, output
from . import architectures
from .features import resolve_layer
from .provenance import gate_fingerprint, package_versions, utc_now
from .statistics import roc_auc, stratified_split

logger = logging.getLogger(__name__)

REQUIRED_METADATA = (
    "model",
    "layer",
    "pooling",
    "hidden_size",
    "n_train",
    "test_accuracy",
    "test_auc",
    "data",
    "seed",
)


@dataclass(frozen=True)
class BehaviorData:
    """Texts labeled 1 (undesired behavior) or 0 (acceptable), and where they came from."""

    texts: list[str]
    labels: list[int]
    description: str

    @property
    def undesired(self) -> list[str]:
        """The texts labeled 1 (what region_scoring ``gate_contrast`` contrasts with benign text)."""
        return [t for t, label in zip(self.texts, self.labels, strict=True) if label == 1]


@dataclass
class Probe:
    """A trained behavior probe: ``direction = weight[1]`` points towards the undesired class."""

    weight: torch.Tensor  # (2, hidden)
    bias: torch.Tensor  # (2,)
    metadata: dict = field(default_factory=dict)

    @property
    def direction(self) -> torch.Tensor:
        return self.weight[1]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """P(undesired) for each feature row."""
        return self.logits(features).softmax(-1)[:, 1]

    def validate(self, model: nn.Module | architectures.GateRows | None = None) -> None:
        direction = self.direction
        if direction.ndim != 1:
            raise SurgeryError(f"probe direction must be a vector, got shape {tuple(direction.shape)}")
        if not torch.isfinite(self.weight).all():
            raise SurgeryError("probe has NaN or infinite values; retrain it")
        if float(direction.norm()) == 0.0:
            raise SurgeryError("probe direction is all zeros; it cannot select or move gate rows")
        if model is not None:
            expected = architectures.gates_of(model).hidden_size
            if expected != self.hidden_size:
                raise SurgeryError(
                    f"probe hidden size {self.hidden_size} does not match the model's {expected} "
                    f"(probe made for '{self.metadata.get('model', '?')}')"
                )

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the probe (an existing probe file there is replaced only with ``overwrite``; anything else
        there is refused: :func:`surgery_plugin.io.files.output`)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "direction": self.direction.contiguous().clone(),
            "weight": self.weight.contiguous(),
            "bias": self.bias.contiguous(),
        }
        metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        with output(path, "probe", overwrite, folder=False, what="probe file") as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | architectures.GateRows | None = None) -> Probe:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file() or is_temp_name(path):
            raise SurgeryError(f"probe file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                keys = set(f.keys())
                if not {"weight", "bias"} <= keys:
                    raise SurgeryError(
                        f"{path} is not a surgery probe (tensors {sorted(keys)}, expected weight and bias)"
                    )
                weight, bias = f.get_tensor("weight").float(), f.get_tensor("bias").float()
        except SafetensorError as err:
            raise SurgeryError(f"{path} is not a readable safetensors probe: {err}") from err
        missing = [k for k in REQUIRED_METADATA if k not in raw_meta]
        if missing:
            raise SurgeryError(f"probe {path} lacks metadata {missing}; it was not written by surgery_plugin")
        metadata = {}
        for key, value in sorted(raw_meta.items()):  # the file's order is a hash order
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                metadata[key] = value
        if weight.ndim != 2 or weight.shape[0] != 2:
            raise SurgeryError(f"probe weight must have shape (2, hidden), got {tuple(weight.shape)}")
        probe = cls(weight=weight, bias=bias, metadata=metadata)
        probe.validate(model)
        return probe

    def sha256(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.weight.float().numpy().tobytes())
        digest.update(self.bias.float().numpy().tobytes())
        return digest.hexdigest()


_DEFAULTS = SurgeryHyperParams()


@dataclass(frozen=True)
class ProbeTraining:
    """How the linear head is trained; the defaults are :class:`SurgeryHyperParams`' (the paper's
    recipe: Adam lr 1e-4, batch 16, epochs fixed in advance, no test peeking)."""

    epochs: int = _DEFAULTS.probe_epochs
    lr: float = _DEFAULTS.probe_lr
    batch_size: int = _DEFAULTS.probe_batch_size
    test_fraction: float = _DEFAULTS.probe_test_fraction
    seed: int = _DEFAULTS.seed
    weight_decay: float = 0.0
    method: str = _DEFAULTS.probe_method  # "linear" (softmax head) or "mean_difference"

    @classmethod
    def from_hparams(cls, hparams: SurgeryHyperParams | None = None) -> ProbeTraining:
        hp = hparams if hparams is not None else SurgeryHyperParams()
        return cls(
            epochs=hp.probe_epochs,
            lr=hp.probe_lr,
            batch_size=hp.probe_batch_size,
            test_fraction=hp.probe_test_fraction,
            seed=hp.seed,
            method=hp.probe_method,
        )


def check_labels(labels: Sequence[int]) -> None:
    labels = list(labels)
    if not labels:
        raise SurgeryError("probe data is empty")
    bad = sorted({label for label in labels if label not in (0, 1)})
    if bad:
        raise SurgeryError(f"probe labels must be 0 (acceptable) or 1 (undesired), got {bad[:5]}")
    counts = (labels.count(0), labels.count(1))
    if min(counts) < 2:
        raise SurgeryError(
            f"probe data needs at least 2 examples of each class, got {counts[0]} acceptable and {counts[1]} undesired"
        )


def train_probe(
    features: torch.Tensor, labels: Sequence[int], config: ProbeTraining | None = None, progress: bool = True
) -> tuple[Probe, dict]:
    """Train the linear head; returns the probe and its held-out metrics."""
    config = config if config is not None else ProbeTraining()
    check_labels(labels)
    if not torch.isfinite(features).all():
        raise SurgeryError(
            "probe features contain NaN or infinite values (is the model loaded in a dtype it overflows in?)"
        )
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    train_idx, test_idx = stratified_split(labels_t.tolist(), config.test_fraction, config.seed)
    if config.method == "mean_difference":
        probe = difference_of_means(features[train_idx], labels_t[train_idx].tolist(), midpoint_bias=True)
    else:
        probe = _train_linear_head(features, labels_t, train_idx, config, progress)
    metrics = {"n_train": int(len(train_idx)), "n_test": int(len(test_idx))}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        if len(idx) == 0:
            metrics[f"{split}_accuracy"] = metrics[f"{split}_auc"] = float("nan")
            continue
        with torch.no_grad():
            scores = probe.score(features[idx])
        truth = labels_t[idx]
        metrics[f"{split}_accuracy"] = float(((scores >= 0.5).long() == truth).float().mean())
        metrics[f"{split}_auc"] = roc_auc(scores.numpy(), truth.numpy())
    return probe, metrics


def _train_linear_head(
    features: torch.Tensor, labels_t: torch.Tensor, train_idx: np.ndarray, config: ProbeTraining, progress: bool
) -> Probe:
    generator = torch.Generator().manual_seed(config.seed)
    head = nn.Linear(features.shape[1], 2)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    x_train, y_train = features[train_idx].float(), labels_t[train_idx]
    for _ in tqdm(range(config.epochs), desc="probe epochs", disable=not progress):
        perm = torch.randperm(len(train_idx), generator=generator)
        for start in range(0, len(perm), config.batch_size):
            batch = perm[start : start + config.batch_size]
            loss = nn.functional.cross_entropy(head(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Probe(weight=head.weight.detach().clone(), bias=head.bias.detach().clone())


def difference_of_means(features: torch.Tensor, labels: Sequence[int], midpoint_bias: bool = False) -> Probe:
    """The undesired-minus-acceptable class mean as a probe (``probe_method: mean_difference``, and the
    fallback for too little data to train a classifier). ``midpoint_bias``: the decision threshold sits
    halfway between the class means, so the probe's accuracy means something."""
    labels_t = torch.as_tensor(list(labels))
    if (labels_t == 0).sum() == 0 or (labels_t == 1).sum() == 0:
        raise SurgeryError("a difference-of-means probe needs at least one example of each class")
    undesired, acceptable = features[labels_t == 1].float().mean(0), features[labels_t == 0].float().mean(0)
    direction = undesired - acceptable
    weight = torch.stack([-direction / 2, direction / 2])
    offset = float(direction @ (undesired + acceptable) / 2) if midpoint_bias else 0.0
    return Probe(weight=weight, bias=torch.tensor([offset / 2, -offset / 2]))


# below this many examples of either class a classifier's held-out numbers mean nothing
MIN_PER_CLASS_FOR_CLASSIFIER = 16


def check_both_classes(data: BehaviorData) -> None:
    labels = list(data.labels)
    if not labels:
        raise SurgeryError(f"probe data is empty ({data.description})")
    counts = (labels.count(0), labels.count(1))
    if min(counts) == 0:
        raise SurgeryError(
            f"probe data has a single class ({counts[0]} acceptable, {counts[1]} undesired); it needs both"
        )


def probe_from_features(
    model: nn.Module,
    data: BehaviorData,
    features: torch.Tensor,
    layer: int,
    pooling: str,
    training: ProbeTraining | None = None,
    max_length: int = 256,
    progress: bool = False,
) -> tuple[Probe, dict]:
    """Train (or, with too few examples, difference-of-means) a probe on precomputed features.

    ``probe.metadata`` records how it was made: model, layer, pooling, data, training recipe,
    held-out metrics, package versions and time.
    """
    training = training if training is not None else ProbeTraining()
    check_both_classes(data)
    labels = list(data.labels)
    if min(labels.count(0), labels.count(1)) < MIN_PER_CLASS_FOR_CLASSIFIER:
        probe = difference_of_means(features, labels)
        nan = float("nan")
        metrics = {
            "method": "difference_of_means",
            "n_train": len(labels),
            "n_test": 0,
            "test_accuracy": nan,
            "test_auc": nan,
        }
    else:
        check_labels(labels)
        probe, metrics = train_probe(features, labels, training, progress)
        metrics["method"] = "linear_softmax" if training.method == "linear" else "mean_difference"
    probe.metadata = {
        "model": architectures.model_name(model),
        "layer": resolve_layer(model, layer),
        "layer_requested": layer,
        "pooling": pooling,
        "hidden_size": probe.hidden_size,
        "data": data.description,
        "seed": training.seed,
        "training": {
            "method": training.method,
            "epochs": training.epochs,
            "lr": training.lr,
            "batch_size": training.batch_size,
            "test_fraction": training.test_fraction,
            "weight_decay": training.weight_decay,
        },
        "max_length": max_length,
        "gate_fingerprint": gate_fingerprint(model),  # which weights: a sequential edit checks it
        "versions": package_versions(),
        "created": utc_now(),
        **metrics,
    }
    logger.info(
        "probe at layer %s: held-out accuracy %.4f, AUC %.4f",
        probe.metadata["layer"],
        metrics["test_accuracy"],
        metrics["test_auc"],
    )
    return probe, metrics
