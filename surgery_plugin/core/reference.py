"""Statistics of benign (and undesired) text that the edit variants beyond the paper use.

``probe_project_out: benign_mean`` removes the probe direction's component along the mean benign
hidden state at the probe layer; ``gate_benign_mean`` does so per edited layer along that gate's mean
input; ``region_scoring: gate_contrast`` scores rows by the undesired-minus-benign gate-input mean, and
``edit_direction: gate_mean_difference`` also adds that difference (per layer) instead of the probe.
Pure functions over pooled states: which texts are used and how their states are computed is the
pipeline's (:func:`surgery_plugin.pipeline.build_edit`), the benign texts from the split table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SurgeryHyperParams
from ..errors import SurgeryError


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
    # region_scoring: activation. layer -> (rows, hidden) mean over tokens of act'(pre) * up . x * x, per text class
    # (diagnostics.gate_sensitivities), and the vectors the rows write (MlpReadout.down_columns)
    undesired_sensitivities: dict[int, torch.Tensor] | None = None
    benign_sensitivities: dict[int, torch.Tensor] | None = None
    down_columns: dict[int, torch.Tensor] | None = None
    description: str = ""


@dataclass(frozen=True)
class ReferenceNeeds:
    """Which pooled states of which texts ``hparams`` needs beyond the probe (all False: the paper's edit)."""

    benign_hidden: bool  # benign text at the probe layer (probe_project_out: benign_mean)
    # benign text at each edited gate's input (gate_benign_mean, gate_contrast, gate_mean_difference)
    benign_gates: bool
    undesired_gates: bool  # the probe data's undesired texts at each edited gate's input (the last two)
    sensitivities: bool = False  # token-level gate sensitivities of both text sets (region_scoring: activation)

    @property
    def undesired_texts(self) -> bool:
        """Whether the probe data's undesired texts are read (gate means or sensitivities)."""
        return self.undesired_gates or self.sensitivities

    @property
    def any(self) -> bool:
        return self.benign_hidden or self.benign_gates or self.undesired_gates or self.sensitivities


def reference_needs(hparams: SurgeryHyperParams) -> ReferenceNeeds:
    contrast = hparams.region_scoring == "gate_contrast" or hparams.edit_direction == "gate_mean_difference"
    return ReferenceNeeds(
        benign_hidden=hparams.probe_project_out == "benign_mean",
        benign_gates=hparams.probe_project_out == "gate_benign_mean" or contrast,
        undesired_gates=contrast,
        sensitivities=hparams.region_scoring == "activation",
    )


def reference_stats(
    benign_hidden: torch.Tensor | None,
    benign_gates: dict[int, torch.Tensor] | None,
    undesired_gates: dict[int, torch.Tensor] | None,
    description: str,
) -> ReferenceStats:
    """The means over texts of pooled states, each ``(texts, hidden)``: the statistics the variants use."""
    if undesired_gates is not None and not benign_gates:
        raise SurgeryError("the gate-input contrast needs the benign gate inputs as well as the undesired ones")
    return ReferenceStats(
        benign_feature_mean=benign_hidden.mean(0) if benign_hidden is not None else None,
        benign_gate_means={layer: x.mean(0) for layer, x in benign_gates.items()} if benign_gates else None,
        undesired_gate_means={layer: x.mean(0) for layer, x in undesired_gates.items()} if undesired_gates else None,
        description=description,
    )
