"""Step 3 of Model Surgery: move the selected gate rows along the probe.

``execute_surgery`` computes the edit and touches nothing; ``apply_edit`` writes it into the
model and returns the original weights; ``revert_edit`` puts them back bitwise. Every change of
gate rows, in place or merged from a PEFT adapter, goes through :func:`apply_row_updates`: the
update is computed in float32 and cast to the weight's dtype once, so an edit of a bf16 model is
the same bits whichever way it is applied.

Building the probe and the reference statistics from hparams is :func:`surgery_plugin.pipeline.build_edit`;
EasyEdit's ``apply_surgery_to_model`` lives in :mod:`surgery_plugin.integrations.easyedit.surgery_main`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import SurgeryHyperParams
from ..errors import SurgeryError
from . import architectures
from .probe import Probe
from .reference import ReferenceStats, project_out
from .regions import RegionSelection, activation_scores, layer_range, mean_row_norm, scan_gates, score_layer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowUpdate:
    """``gate_rows[rows] += scales[:, None] * direction`` in one gate module: a rank-1 change."""

    module_name: str  # the gate module, relative to the CausalLM
    rows: torch.Tensor  # (n,) long, gate-row indices
    scales: torch.Tensor  # (n,) float32, the step of each row
    direction: torch.Tensor  # (hidden,) float32


@dataclass
class SurgeryEdit:
    """``rows[l] += step * direction`` for every selected row of every layer ``l``.

    Per layer the change of the gate weight is ``step * row_mask ⊗ direction``: rank one.
    """

    direction: torch.Tensor  # (hidden,) float32, unit length when normalized
    step: float  # alpha, or alpha * mean gate-row norm when normalized
    alpha: float
    regions: RegionSelection
    module_names: dict[int, str]  # layer -> gate module name (relative to the CausalLM)
    metadata: dict[str, Any] = field(default_factory=dict)
    layer_directions: dict[int, torch.Tensor] | None = (
        None  # per-layer directions (probe_project_out: gate_benign_mean)
    )

    def direction_of(self, layer: int) -> torch.Tensor:
        """The direction added to the selected rows of ``layer``, float32."""
        return (self.layer_directions[layer] if self.layer_directions else self.direction).float()

    @property
    def layers(self) -> list[int]:
        return sorted(self.regions.rows)

    def row_updates(self) -> list[RowUpdate]:
        """The edit as one :class:`RowUpdate` per edited layer."""
        step = torch.tensor(self.step, dtype=torch.float32)
        return [
            RowUpdate(self.module_names[layer], rows, step.expand(len(rows)), self.direction_of(layer))
            for layer, rows in sorted(self.regions.rows.items())
        ]

    def with_alpha(self, alpha: float) -> SurgeryEdit:
        """The same rows and direction with another alpha (the step scales with it)."""
        if self.alpha == 0:
            raise SurgeryError("cannot rescale an edit made with alpha 0; recompute it")
        step = self.step * alpha / self.alpha
        return SurgeryEdit(
            self.direction,
            step,
            alpha,
            self.regions,
            self.module_names,
            dict(self.metadata, alpha=alpha, step=step),
            self.layer_directions,
        )


def control_edit(edit: SurgeryEdit, seed: int) -> SurgeryEdit:
    """The null edit of the same size: the same rows, layers and step, each layer's direction replaced by a
    random unit direction orthogonal to it (and to the shared probe direction), scaled to its length.

    Any change a control makes is what "some perturbation of this size" does; an edit's effect is worth
    reporting against the band several controls give. The direction is a function of ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    shared = edit.direction.float()

    def random_like(direction: torch.Tensor) -> torch.Tensor:
        basis: list[torch.Tensor] = []
        for v in (shared, direction.float()):  # an orthonormal basis of the edit's own directions
            for b in basis:
                v = v - (v @ b) * b
            if float(v.norm()) > 1e-6 * float(shared.norm()):
                basis.append(v / v.norm())
        r = torch.randn(direction.shape, generator=generator, dtype=torch.float32)
        for b in basis:
            r = r - (r @ b) * b
        return r * (direction.norm() / r.norm().clamp_min(1e-12))

    direction = random_like(shared)
    layer_directions = None
    if edit.layer_directions is not None:
        layer_directions = {layer: random_like(d.float()) for layer, d in sorted(edit.layer_directions.items())}
    metadata = dict(edit.metadata, control_seed=seed, control_of=edit.metadata.get("probe", {}).get("data"))
    return SurgeryEdit(direction, edit.step, edit.alpha, edit.regions, edit.module_names, metadata, layer_directions)


def mean_gate_row_norm(model: nn.Module | architectures.GateRows, layers: Sequence[int]) -> float:
    """The mean over ``layers`` of each layer's mean gate-row norm (float32), as the edit computes it."""
    gates = architectures.gates_of(model)
    any_direction = torch.ones(gates.hidden_size)  # the norms do not depend on it
    with torch.no_grad():
        means = [score_layer(gates, layer, any_direction)[1].mean() for layer in layers]
    return mean_row_norm(means)


def execute_surgery(
    model: nn.Module | architectures.GateRows,
    probe: Probe | torch.Tensor,
    hparams: SurgeryHyperParams,
    stats: ReferenceStats | None = None,
    progress: bool = False,
) -> SurgeryEdit:
    """Compute the edit (rows per layer, direction(s), step) without changing the model.

    ``model`` is a loaded model or any :class:`~surgery_plugin.architectures.GateRows`, e.g. the
    gates of a checkpoint read shard by shard (:mod:`surgery_plugin.streaming`): the same pass
    over the same row blocks either way, so the edit is bitwise the same. ``stats``
    (:func:`.reference.reference_stats`) is needed by the variants beyond the paper
    (``probe_project_out``, ``region_scoring``, ``edit_direction``); :func:`surgery_plugin.pipeline.build_edit`
    computes it.
    """
    gates = architectures.gates_of(model)
    if isinstance(probe, torch.Tensor):
        probe = Probe(weight=torch.stack([-probe.float(), probe.float()]), bias=torch.zeros(2))
    probe.validate(gates)
    if hparams.needs_reference_stats() and stats is None:
        raise SurgeryError(
            f"{hparams.variants()} need statistics of benign text: use pipeline.build_edit "
            "(or pass stats=reference_stats(...))"
        )
    direction = probe.direction.float().cpu()
    layers = layer_range(gates.num_layers, hparams.layer_range)
    if hparams.probe_project_out == "benign_mean":
        direction = project_out(direction, stats.benign_feature_mean)
    if hparams.normalize:
        direction = direction / direction.norm()
    layer_directions = None
    if hparams.probe_project_out == "gate_benign_mean":  # same length as the shared direction: alpha keeps its meaning
        layer_directions = {
            layer: _with_norm(project_out(direction, stats.benign_gate_means[layer]), direction.norm())
            for layer in layers
        }
    contrasts = None
    if stats is not None and stats.undesired_gate_means is not None:
        contrasts = {layer: stats.undesired_gate_means[layer] - stats.benign_gate_means[layer] for layer in layers}
    if hparams.edit_direction == "gate_mean_difference":  # read and pushed in each gate's own input space
        layer_directions = {layer: _with_norm(contrasts[layer].float(), direction.norm()) for layer in layers}
    score_directions = layer_directions if layer_directions is not None else direction
    if hparams.region_scoring == "gate_contrast":
        score_directions = contrasts
    row_scores = None
    if hparams.region_scoring == "activation":
        row_scores = {
            layer: activation_scores(
                stats.undesired_sensitivities[layer],
                stats.benign_sensitivities[layer],
                stats.down_columns[layer],
                layer_directions[layer] if layer_directions is not None else direction,
                direction,
            )
            for layer in layers
        }
    scan = scan_gates(
        gates, score_directions, hparams.top_k, hparams.max_rows_per_layer, hparams.layer_range, progress, row_scores
    )
    step = hparams.alpha * scan.mean_row_norm if hparams.normalize else float(hparams.alpha)
    regions = scan.regions
    metadata = {
        "alpha": float(hparams.alpha),
        "step": step,
        "normalize": bool(hparams.normalize),
        "top_k": hparams.top_k,
        "num_rows": regions.num_rows,
        "rows_per_layer": {str(k): v for k, v in regions.counts().items()},
        "probe_norm": float(probe.direction.norm()),
        "probe_project_out": hparams.probe_project_out,
        "region_scoring": hparams.region_scoring,
        "edit_direction": hparams.edit_direction,
        "reference_stats": stats.description if stats is not None else None,
        "probe": {k: v for k, v in probe.metadata.items()},
    }
    module_names = {layer: gates.module_name(layer) for layer in regions.rows}
    if layer_directions is not None:
        layer_directions = {layer: layer_directions[layer] for layer in regions.rows}
    return SurgeryEdit(direction, step, float(hparams.alpha), regions, module_names, metadata, layer_directions)


def _with_norm(vector: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return vector * (norm / vector.norm().clamp_min(1e-12))


def _weight_and_name(model: nn.Module, module_name: str) -> tuple[str, torch.nn.Parameter]:
    base = architectures.unwrap(model)
    module = base.get_submodule(module_name)
    module = getattr(module, "base_layer", module)
    weight = module.weight
    for name, param in model.named_parameters():
        if param is weight:
            return name, weight
    return f"{module_name}.weight", weight


def apply_row_updates(
    model: nn.Module, updates: Sequence[RowUpdate], return_orig_weights: bool = True
) -> dict[str, torch.Tensor]:
    """The one in-place change of gate rows; returns ``{param_name: original weight}``."""
    spec = architectures.gate_spec(model)
    weights_copy: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for update in updates:
            name, weight = _weight_and_name(model, update.module_name)
            if return_orig_weights and name not in weights_copy:
                weights_copy[name] = weight.detach().clone()
            gate_rows = architectures.gate_rows_of_weight(weight, spec)
            index = update.rows.to(weight.device)
            delta = update.scales.float()[:, None].to(weight.device) * update.direction.float()[None, :].to(
                weight.device
            )
            gate_rows[index] = (gate_rows[index].float() + delta).to(weight.dtype)
    return weights_copy


def apply_edit(model: nn.Module, edit: SurgeryEdit, return_orig_weights: bool = True) -> dict[str, torch.Tensor]:
    """Write the edit into the model in place; returns ``{param_name: original weight}``."""
    return apply_row_updates(model, edit.row_updates(), return_orig_weights)


def revert_edit(model: nn.Module, weights_copy: dict[str, torch.Tensor]) -> None:
    """Restore the weights returned by :func:`apply_edit` (bitwise)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, original in weights_copy.items():
            if name not in params:
                raise SurgeryError(f"cannot restore '{name}': the model has no such parameter")
            params[name].copy_(original)
