"""Step 1 of Model Surgery: the behavior probe.

Hidden-state features of the frozen LM (masked pooling over real tokens), and a 2-class linear
head trained with softmax cross-entropy as in the paper. The probe is ``v = W[1]``, the weight
row of the undesired class. The head starts at zero, so ``W[1] = -W[0]`` throughout training
(their gradients and Adam updates are exact negatives) and ``v`` is the discriminative direction
with no random-init component.

Probes are safetensors files; their header metadata records how they were made
(:func:`probe_from_features`: model, layer, pooling, data, training recipe, versions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import architectures
from .atomic import atomic_path
from .batching import length_sorted_batches, pad
from .data import BehaviorData
from .data.splits import stratified_shuffle
from .errors import SurgeryError
from .hparams import SurgeryHyperParams
from .provenance import gate_fingerprint, package_versions, utc_now

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "last"]
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


class _StopForward(Exception):
    """Raised by a hook once everything needed was captured: the rest of the forward pass is skipped."""


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A hidden-state index in HF's ``hidden_states`` numbering: 0 = embeddings, L = final (normed)."""
    return architectures.hidden_state_index(layer, architectures.full_num_layers(model))


def _captures(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    hidden_indices: Sequence[int],
    gate_layers: Sequence[int] = (),
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """``hidden_states[i]`` for each hidden index and the input of each listed layer's gate module, from
    one forward pass that stops as soon as the last of them was seen (the LM head never runs).

    ``model`` may hold only its first layers (``models.load_model(..., probe_layer=...)``): then the
    output of its last layer is ``hidden_states[len(layers)]``, the input of the first missing layer.
    """
    transformer = architectures.base_transformer(model)
    layers = architectures.decoder_layers(model)
    gates = architectures.gate_modules(model)
    loaded, full = len(layers), architectures.full_num_layers(model)
    needed = max([i for i in hidden_indices] + [g + 1 for g in gate_layers], default=0)
    if needed > loaded:
        raise SurgeryError(f"hidden_states[{needed}] needs {needed} layers; this model was loaded with {loaded}")
    final = full in hidden_indices and full == loaded  # the normed final state: the whole stack runs
    hidden: dict[int, torch.Tensor] = {}
    gate_inputs: dict[int, torch.Tensor] = {}
    # execution order: layer i's input (2i) comes before its gate's input (2i + 1)
    positions = [2 * i for i in hidden_indices if not (final and i == full)] + [2 * layer + 1 for layer in gate_layers]
    last = None if final else max(positions)

    def hook(store: dict, key: int, position: int, output: bool = False):
        def grab_input(_module, args, kwargs):
            store[key] = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            if position == last:
                raise _StopForward

        def grab_output(_module, _args, result):
            store[key] = result[0] if isinstance(result, tuple) else result
            if position == last:
                raise _StopForward

        return grab_output if output else grab_input

    handles = []
    for i in hidden_indices:
        if i < loaded:
            handles.append(layers[i].register_forward_pre_hook(hook(hidden, i, 2 * i), with_kwargs=True))
        elif not final:  # i == loaded < full: the last loaded layer's output is the next layer's input
            handles.append(layers[loaded - 1].register_forward_hook(hook(hidden, i, 2 * i, output=True)))
    handles += [
        gates[layer].register_forward_pre_hook(hook(gate_inputs, layer, 2 * layer + 1), with_kwargs=True)
        for layer in gate_layers
    ]
    try:
        output = transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if final:
            hidden[full] = output.last_hidden_state
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in hidden_indices if i not in hidden] + [g for g in gate_layers if g not in gate_inputs]
    if missing:
        raise RuntimeError(f"layers {missing} were never called")
    return hidden, gate_inputs


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    states = states.float().cpu()
    if pooling == "mean":
        return (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return states[torch.arange(states.shape[0]), mask.sum(1) - 1]


@contextlib.contextmanager
def keep_text_end(tokenizer) -> Iterator[None]:
    """Truncate from the left while tokenizing probe texts: a long text is often prompt + answer, and the
    answer is what differs. SafeEdit's adversarial prompts run to 400+ tokens; cut from the right at
    ``max_length`` the safe and unsafe texts of one prompt would become the same prompt prefix."""
    side = getattr(tokenizer, "truncation_side", None)
    if side is None:
        yield
        return
    tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.truncation_side = side


@torch.no_grad()
def pooled_states(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    hidden_indices: Sequence[int] = (),
    gate_layers: Sequence[int] = (),
    pooling: Pooling = "mean",
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Pooled ``hidden_states[i]`` and pooled gate inputs, each (len(texts), hidden) float32 in the order of
    ``texts``, for any number of layers from ONE forward pass per batch.

    Texts are tokenized once, batched by length (little padding), right-padded by hand (the
    tokenizer's padding settings are left alone) and pooled over real tokens only.
    """
    if pooling not in ("mean", "last"):
        raise SurgeryError(f"pooling must be 'mean' or 'last', got '{pooling}'")
    if len(texts) == 0:
        raise SurgeryError("no texts to compute probe features from")
    hidden_indices = sorted({resolve_layer(model, i) for i in hidden_indices})
    gate_layers = sorted(set(gate_layers))
    device = _model_device(model)
    with keep_text_end(tokenizer):
        encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    encoded = [ids if len(ids) else [tokenizer.eos_token_id] for ids in encoded]
    width = architectures.hidden_size(model)
    hidden = {i: torch.empty(len(texts), width, dtype=torch.float32) for i in hidden_indices}
    gates = {layer: torch.empty(len(texts), width, dtype=torch.float32) for layer in gate_layers}
    desc = f"features@{','.join(map(str, hidden_indices))}" + (" + gate inputs" if gate_layers else "")
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size, desc=desc, progress=progress):
            input_ids, mask = pad(
                [encoded[i] for i in batch], 0, "right"
            )  # right padding: causal positions never see it
            got_hidden, got_gates = _captures(
                model, input_ids.to(device), mask.to(device), hidden_indices, gate_layers
            )
            for i, states in got_hidden.items():
                hidden[i][batch] = _pool(states, mask, pooling)
            for layer, states in got_gates.items():
                gates[layer][batch] = _pool(states, mask, pooling)
    finally:
        model.train(was_training)
    return hidden, gates


def hidden_features(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layer: int = -1,
    pooling: Pooling = "mean",
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled ``hidden_states[layer]`` (HF numbering), (len(texts), hidden) in float32, in the order of ``texts``."""
    index = resolve_layer(model, layer)
    hidden, _ = pooled_states(model, tokenizer, texts, [index], (), pooling, batch_size, max_length, progress)
    return hidden[index]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


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

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "direction": self.direction.contiguous().clone(),
            "weight": self.weight.contiguous(),
            "bias": self.bias.contiguous(),
        }
        metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | architectures.GateRows | None = None) -> Probe:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
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


def split_indices(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split, the same for the same labels and seed."""
    train, test = [], []
    for idx in stratified_shuffle(np.asarray(labels).tolist(), seed).values():
        n_test = max(1, int(round(len(idx) * test_fraction))) if test_fraction > 0 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


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
    train_idx, test_idx = split_indices(labels_t.numpy(), config.test_fraction, config.seed)
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


def _check_both_classes(data: BehaviorData) -> None:
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
    _check_both_classes(data)
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


def make_probe(
    model: nn.Module,
    tokenizer,
    data: BehaviorData,
    layer: int = -1,
    pooling: str = "mean",
    training: ProbeTraining | None = None,
    feature_batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> tuple[Probe, dict]:
    """Features of ``data`` at ``layer`` -> trained probe with its provenance in ``probe.metadata``."""
    _check_both_classes(data)
    features = hidden_features(model, tokenizer, data.texts, layer, pooling, feature_batch_size, max_length, progress)
    return probe_from_features(model, data, features, layer, pooling, training, max_length, progress)


def probe_from_hparams(
    model: nn.Module, tokenizer, data: BehaviorData, hparams: SurgeryHyperParams, progress: bool = True
) -> tuple[Probe, dict]:
    """:func:`make_probe` with every setting (layer, pooling, training, batching, length) from ``hparams``."""
    return make_probe(
        model,
        tokenizer,
        data,
        hparams.probe_layer,
        hparams.pooling,
        ProbeTraining.from_hparams(hparams),
        hparams.feature_batch_size,
        hparams.max_length,
        progress,
    )


# ---------------------------------------------------------------------------- statistics of benign text


def project_out(direction: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``direction`` minus its component along ``basis`` (float32)."""
    unit = basis.float() / basis.float().norm().clamp_min(1e-12)
    direction = direction.float()
    return direction - (direction @ unit) * unit


@dataclass(frozen=True)
class ReferenceStats:
    """Mean hidden states the edit variants beyond the paper use (``SurgeryHyperParams.needs_reference_stats``)."""

    benign_feature_mean: torch.Tensor | None = None  # (hidden,) at the probe layer, pooled like the probe
    benign_gate_means: dict[int, torch.Tensor] | None = None  # layer -> mean input of its gate on benign text
    undesired_gate_means: dict[int, torch.Tensor] | None = None  # layer -> the same on the probe's undesired texts
    description: str = ""


def reference_stats(
    model: nn.Module,
    tokenizer,
    hparams: SurgeryHyperParams,
    layers: Sequence[int],
    benign_texts: Sequence[str],
    undesired_texts: Sequence[str] | None = None,
    progress: bool = True,
) -> ReferenceStats:
    """What ``hparams`` needs of :class:`ReferenceStats` for the edited ``layers``, one forward pass per text set."""
    want_feature = hparams.probe_project_out == "benign_mean"
    want_gates = hparams.probe_project_out == "gate_benign_mean" or hparams.region_scoring == "gate_contrast"
    hidden_indices = [hparams.probe_layer] if want_feature else []
    gate_layers = list(layers) if want_gates else []
    hidden, gates = pooled_states(
        model,
        tokenizer,
        benign_texts,
        hidden_indices,
        gate_layers,
        hparams.pooling,
        hparams.feature_batch_size,
        hparams.max_length,
        progress,
    )
    undesired = None
    if hparams.region_scoring == "gate_contrast":
        if not undesired_texts:
            raise SurgeryError("region_scoring: gate_contrast needs the probe data's undesired texts")
        _, undesired_gates = pooled_states(
            model,
            tokenizer,
            undesired_texts,
            (),
            gate_layers,
            hparams.pooling,
            hparams.feature_batch_size,
            hparams.max_length,
            progress,
        )
        undesired = {layer: x.mean(0) for layer, x in undesired_gates.items()}
    return ReferenceStats(
        benign_feature_mean=next(iter(hidden.values())).mean(0) if hidden else None,
        benign_gate_means={layer: x.mean(0) for layer, x in gates.items()} if gates else None,
        undesired_gate_means=undesired,
        description=f"benign n={len(benign_texts)}" + (f", undesired n={len(undesired_texts)}" if undesired else ""),
    )
