"""Step 2 of Model Surgery: which gate rows to edit.

Every gate row ``g`` is scored by ``-cos(g, v)``: the rows most anti-aligned with the probe are
the neurons the paper ties to the behavior, and the ones whose response to behavior-like hidden
states the edit ``g += alpha * v`` changes the most, relative to their size. The paper keeps the
global top-K over all layers; a per-layer cap and a layer range are offered for small models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import architectures
from .errors import InfeasibleEdit, SurgeryError


def gate_row_scores(gate_rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``-cos(g, v)`` for every row of ``gate_rows`` (rows, hidden), computed in float32."""
    rows = gate_rows.float()
    v = direction.float().to(rows.device)
    cos = (rows @ v) / (rows.norm(dim=1).clamp_min(1e-12) * v.norm().clamp_min(1e-12))
    return -cos


Directions = torch.Tensor | dict[int, torch.Tensor]  # one direction, or one per layer


def score_layers(model: nn.Module, direction: Directions, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Scores of every gate row of the given layers (all layers by default), on the CPU; ``direction`` may
    give each layer its own vector."""
    n_layers = len(architectures.decoder_layers(model))
    layers = list(range(n_layers)) if layers is None else layers
    with torch.no_grad():
        return {
            layer: gate_row_scores(
                architectures.gate_rows(model, layer), direction[layer] if isinstance(direction, dict) else direction
            ).cpu()
            for layer in layers
        }


def layer_range(n_layers: int, bounds: list[int] | tuple[int, int] | None) -> list[int]:
    """Layers ``[start, end)``; negative bounds count from the end, like Python slices."""
    if bounds is None:
        return list(range(n_layers))
    if len(bounds) != 2:
        raise SurgeryError(f"layer_range must be [start, end], got {bounds}")
    layers = list(range(n_layers))[slice(*bounds)]
    if not layers:
        raise SurgeryError(f"layer_range {list(bounds)} selects no layer of a {n_layers}-layer model")
    return layers


def resolve_k(top_k: int | float, total_rows: int) -> int:
    """``top_k`` as a count (int, or a whole float >= 1) or a fraction in (0, 1) of all gate rows."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)):
        raise SurgeryError(f"top_k must be a number, got {top_k!r}")
    if isinstance(top_k, float) and 0 < top_k < 1:
        return max(1, round(top_k * total_rows))
    if top_k < 1 or int(top_k) != top_k:
        raise SurgeryError(f"top_k must be a whole count >= 1 or a fraction in (0, 1), got {top_k}")
    if top_k > total_rows:
        raise SurgeryError(f"top_k {int(top_k)} exceeds the model's {total_rows} gate rows")
    return int(top_k)


@dataclass(frozen=True)
class RegionSelection:
    """The selected gate rows: ``rows[layer]`` holds sorted row indices."""

    rows: dict[int, torch.Tensor]
    rows_per_layer_total: int

    @property
    def num_rows(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def row_mask(self, layer: int) -> torch.Tensor:
        mask = torch.zeros(self.rows_per_layer_total, dtype=torch.bool)
        if layer in self.rows:
            mask[self.rows[layer]] = True
        return mask

    def counts(self) -> dict[int, int]:
        return {layer: len(r) for layer, r in sorted(self.rows.items())}


def select_top_k(scores: dict[int, torch.Tensor], k: int, max_rows_per_layer: int | None = None) -> RegionSelection:
    """Global top-``k`` rows by score, optionally at most ``max_rows_per_layer`` from any one layer.

    Ties break by (layer, row) so the selection is a function of the scores alone.
    """
    if not scores:
        raise SurgeryError("no layers to select gate rows from")
    rows_total = len(next(iter(scores.values())))
    candidates_layer, candidates_row, candidates_score = [], [], []
    for layer, layer_scores in sorted(scores.items()):
        order = torch.sort(layer_scores, descending=True, stable=True).indices
        if max_rows_per_layer is not None:
            order = order[:max_rows_per_layer]
        candidates_layer.append(torch.full((len(order),), layer, dtype=torch.long))
        candidates_row.append(order)
        candidates_score.append(layer_scores[order])
    layer_ids, row_ids, all_scores = (torch.cat(t) for t in (candidates_layer, candidates_row, candidates_score))
    if k > len(all_scores):
        raise InfeasibleEdit(
            f"top_k {k} exceeds the {len(all_scores)} candidate rows (layer range / per-layer cap too tight)"
        )
    # lexicographic tie-break: sort by (layer, row) first, then stably by score
    tie_order = torch.argsort(layer_ids * rows_total + row_ids)
    by_score = torch.sort(all_scores[tie_order], descending=True, stable=True).indices
    chosen = tie_order[by_score[:k]]
    rows = {}
    for layer in sorted(set(layer_ids[chosen].tolist())):
        rows[layer] = torch.sort(row_ids[chosen][layer_ids[chosen] == layer]).values
    return RegionSelection(rows=rows, rows_per_layer_total=rows_total)


def select_regions(
    model: nn.Module,
    direction: Directions,
    top_k: int | float,
    max_rows_per_layer: int | None = None,
    layers: list[int] | tuple[int, int] | None = None,
) -> RegionSelection:
    n_layers = len(architectures.decoder_layers(model))
    rows_per_layer = architectures.num_gate_rows(model)
    k = resolve_k(top_k, n_layers * rows_per_layer)
    scores = score_layers(model, direction, layer_range(n_layers, layers))
    return select_top_k(scores, k, max_rows_per_layer)
