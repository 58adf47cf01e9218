"""Step 3 of Model Surgery: move the selected gate rows along the probe.

``execute_surgery`` computes the edit and touches nothing; ``apply_edit`` writes it into the
model and returns the original weights; ``revert_edit`` puts them back bitwise. The update is
computed in float32 and cast to the weight's dtype once, so an edit of a bf16 model is the same
no matter how it is later re-applied (in place, or merged from the PEFT adapter).
"""

from __future__ import annotations

import copy as copy_module
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from . import architectures
from .errors import SurgeryError
from .hparams import SurgeryHyperParams
from .probe import Probe
from .regions import RegionSelection, layer_range, select_regions

logger = logging.getLogger(__name__)


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

    @property
    def layers(self) -> list[int]:
        return sorted(self.regions.rows)

    def row_update(self) -> torch.Tensor:
        """The vector added to every selected row, float32."""
        # the step as a float32 tensor: the adapter stores it in float32, so merge == in-place bitwise
        return self.direction.float() * torch.tensor(self.step, dtype=torch.float32)

    def delta_weight(self, layer: int) -> torch.Tensor:
        """Dense (gate rows, hidden) float32 change of one layer's gate rows."""
        return self.regions.row_mask(layer).float()[:, None] * self.row_update()[None, :]

    def with_alpha(self, alpha: float) -> "SurgeryEdit":
        """The same rows and direction with another alpha (the step scales with it)."""
        if self.alpha == 0:
            raise SurgeryError("cannot rescale an edit made with alpha 0; recompute it")
        step = self.step * alpha / self.alpha
        return SurgeryEdit(self.direction, step, alpha, self.regions, self.module_names, dict(self.metadata, alpha=alpha, step=step))


def mean_gate_row_norm(model: nn.Module, layers: Sequence[int]) -> float:
    with torch.no_grad():
        norms = [architectures.gate_rows(model, layer).float().norm(dim=1).mean() for layer in layers]
    return float(torch.stack(norms).mean())


def execute_surgery(model: nn.Module, probe: Probe | torch.Tensor, hparams: SurgeryHyperParams) -> SurgeryEdit:
    """Compute the edit (rows per layer, direction, step) without changing the model."""
    if isinstance(probe, torch.Tensor):
        probe = Probe(weight=torch.stack([-probe.float(), probe.float()]), bias=torch.zeros(2))
    probe.validate(model)
    direction = probe.direction.float().cpu()
    n_layers = len(architectures.decoder_layers(model))
    layers = layer_range(n_layers, hparams.layer_range)
    if hparams.normalize:
        direction = direction / direction.norm()
        step = hparams.alpha * mean_gate_row_norm(model, layers)
    else:
        step = float(hparams.alpha)
    regions = select_regions(model, direction, hparams.top_k, hparams.max_rows_per_layer, hparams.layer_range)
    names = architectures.gate_module_names(model)
    metadata = {
        "alpha": float(hparams.alpha),
        "step": step,
        "normalize": bool(hparams.normalize),
        "top_k": hparams.top_k,
        "num_rows": regions.num_rows,
        "rows_per_layer": {str(k): v for k, v in regions.counts().items()},
        "probe_norm": float(probe.direction.norm()),
        "probe": {k: v for k, v in probe.metadata.items()},
    }
    return SurgeryEdit(direction, step, float(hparams.alpha), regions, {l: names[l] for l in regions.rows}, metadata)


def _weight_and_name(model: nn.Module, module_name: str) -> tuple[str, torch.nn.Parameter]:
    base = architectures.unwrap(model)
    module = base.get_submodule(module_name)
    module = getattr(module, "base_layer", module)
    weight = module.weight
    for name, param in model.named_parameters():
        if param is weight:
            return name, weight
    return f"{module_name}.weight", weight


def apply_edit(model: nn.Module, edit: SurgeryEdit, return_orig_weights: bool = True) -> dict[str, torch.Tensor]:
    """Write the edit into the model in place; returns ``{param_name: original weight}``."""
    spec = architectures.gate_spec(model)
    update = edit.row_update()
    weights_copy: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer, rows in sorted(edit.regions.rows.items()):
            name, weight = _weight_and_name(model, edit.module_names[layer])
            if return_orig_weights and name not in weights_copy:
                weights_copy[name] = weight.detach().clone()
            gate_rows = architectures.gate_rows_of_weight(weight, spec)
            index = rows.to(weight.device)
            gate_rows[index] = (gate_rows[index].float() + update.to(weight.device)).to(weight.dtype)
    return weights_copy


def revert_edit(model: nn.Module, weights_copy: dict[str, torch.Tensor]) -> None:
    """Restore the weights returned by :func:`apply_edit` (bitwise)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, original in weights_copy.items():
            if name not in params:
                raise SurgeryError(f"cannot restore '{name}': the model has no such parameter")
            params[name].copy_(original)


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

    The probe comes from ``hparams.probe_path`` when set; otherwise it is built from the
    requests' safe (``target_new``) vs. unsafe (``ground_truth``) texts plus ``hparams.probe_data``
    (:func:`pipeline.probe_for_request`). ``keep_original_weight`` and EasyEdit's extra arguments
    (``train_ds``) are accepted and unused: surgery always edits the given (or copied) model and,
    with ``return_orig_weights``, reports the originals through ``weights_copy``, which is how
    EasyEdit restores the model between non-sequential edits.
    """
    from .pipeline import probe_for_request

    if copy:
        model = copy_module.deepcopy(model)
    probe = probe_for_request(model, tok, requests or [], hparams, data_dir=kwargs.get("data_dir"), progress=kwargs.get("progress", False))
    edit = execute_surgery(model, probe, hparams)
    weights_copy = apply_edit(model, edit, return_orig_weights=return_orig_weights)
    logger.info("surgery edited %d gate rows in %d layers (alpha %s)", edit.regions.num_rows, len(edit.layers), hparams.alpha)
    return model, weights_copy
