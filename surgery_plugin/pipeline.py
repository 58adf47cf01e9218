"""Making an edit from hyperparameters, the one path every caller takes: hparams -> probe data -> probe ->
reference statistics -> edit.

``surgery probe`` / ``edit``, the demo, ``surgery stack``, ``surgery compare``, ``surgery tune`` and
EasyEdit's ``apply_surgery_to_model`` all call :func:`build_edit` (or :func:`build_probe`, its first
half). What several edits of one model share (probe data, pooled features, probes) is kept in an
:class:`EditCache`, so a search over many points computes each forward pass once.

The model is only read here, never written: the edit is computed (:func:`surgery_plugin.core.edit.execute_surgery`)
and it is the caller's to apply it in place or export it as an adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .config import SurgeryHyperParams
from .core import architectures
from .core.diagnostics import gate_sensitivities
from .core.edit import SurgeryEdit, apply_edit, execute_surgery, revert_edit
from .core.features import pooled_states, resolve_layer
from .core.probe import BehaviorData, Probe, ProbeTraining, check_both_classes, probe_from_features
from .core.provenance import fingerprint_mismatch, gate_fingerprint, labeled_texts_sha256
from .core.reference import ReferenceStats, reference_needs, reference_stats
from .core.regions import layer_range
from .data.loaders import load_benign_texts
from .data.probe_data import balanced, join, load_behavior_data
from .data.splits import RTP_BENIGN
from .errors import SurgeryError
from .io.stack import StackStep

logger = logging.getLogger(__name__)


class BuiltEdit(NamedTuple):
    probe: Probe
    data: BehaviorData | None  # the probe's texts (None: a saved probe, and nothing needed them)
    edit: SurgeryEdit


# ---------------------------------------------------------------------------- probe data


def load_probe_data(
    spec: str,
    model: nn.Module | None = None,
    tokenizer=None,
    data_dir=None,
    max_per_class: int | None = None,
    seed: int = 0,
    self_judge: str = "minilm",
    progress: bool = True,
) -> BehaviorData:
    """Probe data by name (:mod:`surgery_plugin.data.probe_data`), ``self`` (the model's own judged
    continuations, :mod:`surgery_plugin.evaluation.self_data`), or several joined by ``+``."""
    parts = []
    for name in (p.strip() for p in spec.split("+")):
        if not name:
            continue
        if name == "instructions":
            parts.append(instruction_data(tokenizer, data_dir, max_per_class, seed))
            continue
        if name == "self":
            from .evaluation.self_data import self_continuations

            if model is None:
                raise SurgeryError("probe_data 'self' needs the model (its own continuations are the data)")
            data = self_continuations(model, tokenizer, data_dir, self_judge, seed, progress=progress)
            counts = (data.labels.count(0), data.labels.count(1))
            if min(counts) < 2:
                raise SurgeryError(
                    f"probe_data 'self' gave {counts[0]} acceptable and {counts[1]} undesired continuations "
                    f"(judge {self_judge}); it needs both classes: use another judge or add a data set with +"
                )
            texts, labels = balanced(data.texts, data.labels, max_per_class, seed)
            parts.append(BehaviorData(texts, labels, f"{data.description} max_per_class={max_per_class}"))
        else:
            parts.append(load_behavior_data(name, data_dir, max_per_class, seed))
    if not parts:
        raise SurgeryError(f"probe_data '{spec}' names no data set")
    return parts[0] if len(parts) == 1 else join(parts)


def instruction_data(tokenizer, data_dir=None, max_per_class: int | None = None, seed: int = 0) -> BehaviorData:
    """``probe_data: instructions``: harmful (1) vs. harmless (0) training instructions of the refusal-direction
    splits, each as a user turn of the chat template with the generation prompt (so ``pooling: last`` reads the
    last prompt token, where Arditi et al. find the refusal direction); harmless ones sampled to as many."""
    import random

    from .data.loaders import load_instructions
    from .evaluation.generation import format_prompts

    if tokenizer is None:
        raise SurgeryError("probe_data 'instructions' needs the tokenizer (the chat template formats them)")
    harmful = load_instructions(data_dir, "harmful_train")
    if max_per_class is not None:
        harmful = harmful[:max_per_class]
    harmless = random.Random(seed).sample(load_instructions(data_dir, "harmless_train"), len(harmful))
    texts, chat = format_prompts(tokenizer, harmful + harmless)
    return BehaviorData(
        texts,
        [1] * len(harmful) + [0] * len(harmless),
        f"instructions harmful_train n={len(harmful)} (1) vs harmless_train sample n={len(harmless)} seed={seed} (0), "
        f"chat template {'on' if chat else 'off'}",
    )


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


# ---------------------------------------------------------------------------- what several edits share


def _texts_key(texts: Sequence[str]) -> str:
    return labeled_texts_sha256(texts, [0] * len(texts), length=32)


class EditCache:
    """What several edits of one model share: probe data sets, pooled hidden states and gate inputs,
    trained probes. In memory, for one model state.

    ``fingerprint``: a function of the model keying every entry by its weights (EasyEdit edits request
    after request, sometimes sequentially on edited weights); None when the caller keeps the weights
    fixed (``surgery tune`` checks that they are). ``hidden_hint`` / ``all_gate_layers``: compute these
    layers too whenever a text set is run (a search that will ask for them later pays one pass).
    ``max_entries`` bounds the pooled-state entries (least recently used go first).
    """

    def __init__(
        self,
        fingerprint: Callable[[nn.Module], Hashable] | None = None,
        hidden_hint: Sequence[int] = (),
        all_gate_layers: bool = False,
        max_entries: int | None = None,
    ):
        self.fingerprint = fingerprint
        self.hidden_hint = tuple(hidden_hint)
        self.all_gate_layers = all_gate_layers
        self.max_entries = max_entries
        self.data: dict[tuple, BehaviorData] = {}
        self.probes: dict[tuple, tuple[Probe, dict]] = {}
        self._states: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._pinned: tuple[int, Hashable] | None = None
        self.hits = self.misses = 0

    def _weights(self, model: nn.Module) -> Hashable:
        if self.fingerprint is None:
            return None
        if self._pinned is not None and self._pinned[0] == id(model):
            return self._pinned[1]
        return self.fingerprint(model)

    @contextlib.contextmanager
    def pinned(self, model: nn.Module) -> Iterator[None]:
        """The weights' key computed once for a block that does not change them (one edit being built): a
        fingerprint over every parameter is seconds on a real model, and an edit looks it up several times."""
        if self.fingerprint is None or self._pinned is not None:
            yield
            return
        self._pinned = (id(model), self.fingerprint(model))
        try:
            yield
        finally:
            self._pinned = None

    def probe_data(self, hparams: SurgeryHyperParams, model, tokenizer, data_dir, progress: bool) -> BehaviorData:
        key = (
            self._weights(model) if "self" in hparams.probe_data else None,
            hparams.probe_data,
            hparams.probe_max_per_class,
            hparams.seed,
            hparams.probe_self_judge,
            str(data_dir),
        )
        if key not in self.data:
            self.data[key] = load_probe_data(
                hparams.probe_data,
                model,
                tokenizer,
                data_dir,
                hparams.probe_max_per_class,
                hparams.seed,
                hparams.probe_self_judge,
                progress,
            )
        return self.data[key]

    def pooled(
        self,
        model: nn.Module,
        tokenizer,
        texts: Sequence[str],
        hparams: SurgeryHyperParams,
        hidden_indices: Sequence[int] = (),
        gate_layers: Sequence[int] = (),
        progress: bool = True,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Pooled ``hidden_states[i]`` and gate inputs of ``texts`` (:func:`.core.features.pooled_states`), from
        this cache where they were computed before, the rest in one pass."""
        base = (
            self._weights(model),
            _texts_key(texts),
            hparams.pooling,
            hparams.feature_batch_size,
            hparams.max_length,
        )
        hidden_indices = [resolve_layer(model, i) for i in hidden_indices]
        want = [("hidden", i) for i in hidden_indices] + [("gate", g) for g in gate_layers]
        missing = [w for w in want if (*base, *w) not in self._states]
        self.hits += len(want) - len(missing)
        if missing:
            self.misses += len(missing)
            extra_hidden = (
                [resolve_layer(model, i) for i in self.hidden_hint]
                if any(kind == "hidden" for kind, _ in missing)
                else []
            )
            all_layers = range(len(architectures.decoder_layers(model)))
            extra_gates = list(all_layers) if self.all_gate_layers and any(k == "gate" for k, _ in missing) else []
            run_hidden = sorted({i for kind, i in missing if kind == "hidden"} | set(extra_hidden))
            run_gates = sorted({g for kind, g in missing if kind == "gate"} | set(extra_gates))
            run_hidden = [i for i in run_hidden if (*base, "hidden", i) not in self._states]
            run_gates = [g for g in run_gates if (*base, "gate", g) not in self._states]
            hidden, gates = pooled_states(
                model,
                tokenizer,
                texts,
                run_hidden,
                run_gates,
                hparams.pooling,
                hparams.feature_batch_size,
                hparams.max_length,
                progress,
            )
            for i, x in hidden.items():
                self._put((*base, "hidden", i), x)
            for g, x in gates.items():
                self._put((*base, "gate", g), x)
        found = {w: self._get((*base, *w)) for w in want}
        return (
            {i: found[("hidden", i)] for i in hidden_indices},
            {g: found[("gate", g)] for g in gate_layers},
        )

    def sensitivities(
        self,
        model: nn.Module,
        tokenizer,
        texts: Sequence[str],
        hparams: SurgeryHyperParams,
        layers: Sequence[int],
        progress: bool,
    ) -> dict[int, torch.Tensor]:
        """Token-level gate sensitivities of ``texts`` per layer (:func:`.core.diagnostics.gate_sensitivities`),
        from this cache where they were computed before."""
        base = (self._weights(model), _texts_key(texts), "sensitivity", hparams.feature_batch_size, hparams.max_length)
        missing = [layer for layer in layers if (*base, layer) not in self._states]
        if missing:
            computed = gate_sensitivities(
                model, tokenizer, texts, missing, hparams.feature_batch_size, hparams.max_length, progress
            )
            for layer, value in computed.items():
                self._put((*base, layer), value)
        return {layer: self._get((*base, layer)) for layer in layers}

    def _put(self, key: tuple, value: torch.Tensor) -> None:
        self._states[key] = value
        self._states.move_to_end(key)
        while self.max_entries is not None and len(self._states) > self.max_entries:
            self._states.popitem(last=False)

    def _get(self, key: tuple) -> torch.Tensor:
        self._states.move_to_end(key)
        return self._states[key]


# ---------------------------------------------------------------------------- probe, statistics, edit


def _probe_parts(
    hparams: SurgeryHyperParams, requests: Sequence[dict] | None, data: BehaviorData | None, load: Callable
) -> list[BehaviorData]:
    """The probe's data in parts (each part's features are computed on their own, then stacked)."""
    parts = []
    if requests:
        request_data = requests_to_data(requests)
        if request_data.texts:
            parts.append(request_data)
    if data is not None:
        parts.append(data)
    elif hparams.probe_data:
        parts.append(load())
    return parts


def build_probe(
    model: nn.Module,
    tokenizer,
    hparams: SurgeryHyperParams,
    data: BehaviorData | None = None,
    requests: Sequence[dict] | None = None,
    cache: EditCache | None = None,
    data_dir=None,
    progress: bool = True,
) -> tuple[Probe, BehaviorData]:
    """The probe ``hparams`` describes, trained on ``requests`` (EasyEdit's) and ``data`` (else
    ``hparams.probe_data``); ``probe.metadata`` records how (model, layer, data, recipe, held-out metrics)."""
    cache = cache if cache is not None else EditCache()
    with cache.pinned(model):
        return _build_probe(model, tokenizer, hparams, data, requests, cache, data_dir, progress)


def _build_probe(model, tokenizer, hparams, data, requests, cache: EditCache, data_dir, progress: bool):
    parts = _probe_parts(
        hparams, requests, data, lambda: cache.probe_data(hparams, model, tokenizer, data_dir, progress)
    )
    if not parts:
        raise SurgeryError(
            "no probe: set probe_path or probe_data in the hparams, or pass requests with target_new/ground_truth"
        )
    joined = parts[0] if len(parts) == 1 else join(parts)
    check_both_classes(joined)  # before any forward pass
    index = resolve_layer(model, hparams.probe_layer)
    training = ProbeTraining.from_hparams(hparams)
    key = (
        cache._weights(model),
        tuple(labeled_texts_sha256(p.texts, p.labels, length=32) for p in parts),
        joined.description,
        index,
        hparams.pooling,
        hparams.feature_batch_size,
        hparams.max_length,
        training,
    )
    if key not in cache.probes:
        features = torch.cat(
            [cache.pooled(model, tokenizer, p.texts, hparams, [index], (), progress)[0][index] for p in parts]
        )
        cache.probes[key] = probe_from_features(
            model, joined, features, hparams.probe_layer, hparams.pooling, training, hparams.max_length, progress
        )
    probe, metrics = cache.probes[key]
    # a fresh Probe each time: callers add their own metadata
    return Probe(probe.weight, probe.bias, {**probe.metadata}), joined


def benign_reference_texts(data_dir=None) -> tuple[list[str], str]:
    """The benign documents the statistics of benign text come from (``RTP_BENIGN["reference"]``)."""
    start, end = RTP_BENIGN["reference"]
    return load_benign_texts(data_dir, limit=end - start, start=start), f"rtp nontoxic[{start}:{end}]"


def build_reference_stats(
    model: nn.Module,
    tokenizer,
    hparams: SurgeryHyperParams,
    data: BehaviorData | None,
    cache: EditCache | None = None,
    data_dir=None,
    progress: bool = True,
) -> ReferenceStats | None:
    """What ``hparams`` needs of benign (and undesired) text beyond the probe, for its edited layers; None
    for the paper's edit."""
    needs = reference_needs(hparams)
    if not needs.any:
        return None
    cache = cache if cache is not None else EditCache()
    layers = layer_range(len(architectures.decoder_layers(model)), hparams.layer_range)
    benign, where = benign_reference_texts(data_dir)
    hidden_indices = [hparams.probe_layer] if needs.benign_hidden else []
    gate_layers = layers if needs.benign_gates else []
    benign_hidden, benign_gates = cache.pooled(
        model, tokenizer, benign, hparams, hidden_indices, gate_layers, progress
    )
    undesired_gates, description = None, f"benign {where} n={len(benign)}"
    undesired = data.undesired if data is not None else []
    if needs.undesired_texts and not undesired:
        raise SurgeryError(f"{hparams.variants()} need the probe data's undesired texts")
    if needs.undesired_gates:
        _, undesired_gates = cache.pooled(model, tokenizer, undesired, hparams, (), layers, progress)
    if needs.undesired_texts:
        description += f", undesired n={len(undesired)}"
    stats = reference_stats(
        next(iter(benign_hidden.values())) if benign_hidden else None,
        benign_gates or None,
        undesired_gates,
        description,
    )
    if needs.sensitivities:  # token level: the activation's slope at each token, not a pooled mean
        stats = dataclasses.replace(
            stats,
            undesired_sensitivities=cache.sensitivities(model, tokenizer, undesired, hparams, layers, progress),
            benign_sensitivities=cache.sensitivities(model, tokenizer, benign, hparams, layers, progress),
            down_columns={layer: architectures.mlp_readout(model, layer).down_columns for layer in layers},
        )
    return stats


def build_edit(
    model: nn.Module,
    tokenizer,
    hparams: SurgeryHyperParams,
    data: BehaviorData | None = None,
    requests: Sequence[dict] | None = None,
    cache: EditCache | None = None,
    probe: Probe | None = None,
    data_dir=None,
    progress: bool = True,
) -> BuiltEdit:
    """``(probe, data, edit)`` for ``hparams`` on ``model``, which is read, never written.

    The probe: ``probe`` when given, else ``hparams.probe_path``, else trained (:func:`build_probe`) on
    ``requests`` and ``data`` (else ``hparams.probe_data``). Statistics of benign text come from the split
    table when ``hparams`` needs them (and of the probe data's undesired texts for ``gate_contrast``).
    """
    cache = cache if cache is not None else EditCache()
    with cache.pinned(model):
        return _build_edit(model, tokenizer, hparams, data, requests, cache, probe, data_dir, progress)


def _build_edit(model, tokenizer, hparams, data, requests, cache: EditCache, probe, data_dir, progress: bool):
    if probe is None and hparams.probe_path:
        probe = Probe.load(hparams.probe_path, model)
    if probe is None:
        probe, data = build_probe(model, tokenizer, hparams, data, requests, cache, data_dir, progress)
    elif reference_needs(hparams).undesired_texts:  # a given probe: its data only when the statistics need it
        parts = _probe_parts(
            hparams, requests, data, lambda: cache.probe_data(hparams, model, tokenizer, data_dir, progress)
        )
        if not parts:
            raise SurgeryError(f"{hparams.variants()} need the probe's data: set probe_data in the hparams")
        data = parts[0] if len(parts) == 1 else join(parts)
    stats = build_reference_stats(model, tokenizer, hparams, data, cache, data_dir, progress)
    return BuiltEdit(probe, data, execute_surgery(model, probe, hparams, stats))


def check_probe_made_on(probe: Probe, model: nn.Module, what: str) -> None:
    """A probe records the gate fingerprint of the model it was trained on; a sequential stack step needs
    the model edited by the steps before it."""
    recorded = probe.metadata.get("gate_fingerprint")
    if recorded is not None and fingerprint_mismatch(recorded, gate_fingerprint(model)):
        raise SurgeryError(
            f"the probe of '{what}' was trained on another model ({probe.metadata.get('model', '?')}, other gate "
            "weights); a sequential step's probe must be trained on the model edited by the steps before it"
        )


def build_stack(
    model: nn.Module,
    tokenizer,
    steps: Sequence[tuple[str, SurgeryHyperParams]],
    sequential: bool,
    data_dir=None,
    progress: bool = True,
) -> list[StackStep]:
    """One edit per behavior, in order; ``sequential`` (the paper's multi-attribute recipe): each probe is
    trained, and each edit's rows selected, on the model edited by the steps before it.

    The model is edited in place between sequential steps and restored bitwise before returning."""
    names = [name for name, _ in steps]
    if len(set(names)) != len(names):
        raise SurgeryError(f"a stack names each behavior once, got {names}")
    built, originals = [], []
    try:
        for name, hp in steps:
            probe, _, edit = build_edit(model, tokenizer, hp, data_dir=data_dir, progress=progress)
            check_probe_made_on(probe, model, name)
            built.append(StackStep(name, hp, probe, edit))
            if sequential:
                originals.append(apply_edit(model, edit))
    finally:
        for weights in reversed(originals):
            revert_edit(model, weights)
    return built
