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
    metrics = {"n_train": int(len(train_idx)), "n_test": int(len(test_idx))}
    if config.method == "mean_difference":
        probe = difference_of_means(features[train_idx], labels_t[train_idx].tolist(), midpoint_bias=True)
    elif config.method == "logistic":
        probe, metrics["logistic"] = logistic_probe(features[train_idx], labels_t[train_idx], config.seed)
    else:
        probe = _train_linear_head(features, labels_t, train_idx, config, progress)
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


# L2 penalties tried for ``probe_method: logistic`` (per example, on standardised features); the one with the
# lowest validation log-loss is refitted on all training examples
LOGISTIC_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LOGISTIC_TOLERANCE = 1e-6  # gradient norm (max abs) at which the fit counts as converged
LOGISTIC_VALIDATION_FRACTION = 0.25  # of the training examples, to choose the penalty


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, penalty: float, tolerance: float = LOGISTIC_TOLERANCE, max_iter: int = 2000
) -> tuple[torch.Tensor, float, dict]:
    """``(w, b, info)`` minimising mean log-loss + ``penalty / 2 * |w|^2`` (the bias is not penalised) over
    ``x`` (n, d) and 0/1 ``y``, in float64 by L-BFGS with a strong-Wolfe line search, to a max-abs gradient of
    ``tolerance``; ``info`` says whether it got there."""
    x, y = x.double(), y.double()
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        logits = x @ theta[:-1] + theta[-1]
        return nn.functional.binary_cross_entropy_with_logits(logits, y) + penalty / 2 * theta[:-1].square().sum()

    optimizer = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(params)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        loss = loss_of(params)
        (gradient,) = torch.autograd.grad(loss, params)
    gradient_max = float(gradient.abs().max())
    info = {
        "loss": float(loss.detach()),
        "gradient_max": gradient_max,
        "converged": gradient_max <= tolerance,
        "iterations": int(optimizer.state[params].get("n_iter", 0)),
    }
    theta = params.detach()
    return theta[:-1], float(theta[-1]), info


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation (a constant feature gets 1: it is then ignored, not blown up)."""
    mean, std = x.mean(0), x.std(0)
    return mean, torch.where(std > 1e-8 * std.max().clamp_min(1e-30), std, torch.ones_like(std))


def logistic_probe(features: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[Probe, dict]:
    """``probe_method: logistic``: L2-regularised logistic regression on standardised features, solved to
    :data:`LOGISTIC_TOLERANCE`, its penalty chosen by validation log-loss on a stratified quarter of ``features``
    (from :data:`LOGISTIC_PENALTIES`), then refitted on all of them. The probe is that classifier in the
    raw feature space: ``logit = (w / std) . x + b - (w / std) . mean``."""
    x, y = features.double(), labels.long()
    fit_idx, valid_idx = stratified_split(y.tolist(), LOGISTIC_VALIDATION_FRACTION, seed)
    mean, std = _standardiser(x[fit_idx])
    validation = {}
    for penalty in LOGISTIC_PENALTIES:
        w, b, _ = fit_logistic((x[fit_idx] - mean) / std, y[fit_idx], penalty)
        logits = ((x[valid_idx] - mean) / std) @ w + b
        validation[penalty] = float(nn.functional.binary_cross_entropy_with_logits(logits, y[valid_idx].double()))
    chosen = min(LOGISTIC_PENALTIES, key=lambda p: (validation[p], -p))  # ties: the stronger penalty
    mean, std = _standardiser(x)
    w, b, info = fit_logistic((x - mean) / std, y, chosen)
    if not info["converged"]:
        logger.warning(
            "logistic probe: gradient %.2e above the tolerance after %d iterations",
            info["gradient_max"],
            info["iterations"],
        )
    raw = w / std
    offset = b - float(raw @ mean)
    probe = Probe(
        weight=torch.stack([-raw / 2, raw / 2]).float(),
        bias=torch.tensor([-offset / 2, offset / 2], dtype=torch.float32),
    )
    info = {
        "penalty": chosen,
        "validation_log_loss": {str(p): v for p, v in validation.items()},
        "n_fit": len(fit_idx),
        "n_validation": len(valid_idx),
        **info,
    }
    return probe, info


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
        metrics["method"] = {"linear": "linear_softmax", "logistic": "logistic_l2"}.get(
            training.method, training.method
        )
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
