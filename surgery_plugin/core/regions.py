"""Step 2 of Model Surgery: which gate rows to edit.

Every gate row ``g`` is scored by ``-cos(g, v)``: the rows most anti-aligned with the probe are
the neurons the paper ties to the behavior, and the ones whose response to behavior-like hidden
states the edit ``g += alpha * v`` changes the most, relative to their size. The paper keeps the
global top-K over all layers; a per-layer cap and a layer range are offered for small models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InfeasibleEdit, SurgeryError
from . import architectures
from .architectures import GateRows

# Gate rows are scored this many at a time, wherever they come from (a loaded model or a streamed
# shard): it bounds the float32 copy of a bf16 gate, and it fixes the shapes of every reduction, so
# the in-memory and the streaming edit compute the same bits.
SCORE_BLOCK_ROWS = 512


def _float_buffer(buffer: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``buffer`` if it can hold ``rows`` in float32, else a new one."""
    fits = buffer is not None and buffer.shape[0] >= rows.shape[0] and buffer.shape[1:] == rows.shape[1:]
    if fits and buffer.device == rows.device:
        return buffer
    return torch.empty(rows.shape, dtype=torch.float32, device=rows.device)


def _scores_and_norms(rows: torch.Tensor, v: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-cos(g, v), |g|)`` of each row. The rows are first copied into ``buffer`` (float32,
    contiguous), so the kernels see the same memory whatever the rows' dtype, layout or source."""
    rows = buffer[: rows.shape[0]].copy_(rows)
    v = v.to(rows.device)
    norms = torch.linalg.vector_norm(rows, dim=1)
    cos = (rows @ v) / (norms.clamp_min(1e-12) * v.norm().clamp_min(1e-12))
    return -cos, norms


def score_row_blocks(blocks: Iterable[torch.Tensor], direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, norms)`` of gate rows that arrive as consecutive (rows, hidden) blocks, float32 on the CPU.

    ``scores`` are ``-cos(g, v)``; ``norms`` the rows' float32 lengths, which the normalised step
    needs, computed in the same pass.
    """
    v = direction.float()
    scores, norms = [], []
    buffer = None  # one float32 copy of a block, reused: a fresh one per block costs more than the scoring
    for block in blocks:
        buffer = _float_buffer(buffer, block)
        block_scores, block_norms = _scores_and_norms(block, v, buffer)
        scores.append(block_scores.cpu())
        norms.append(block_norms.cpu())
    return torch.cat(scores), torch.cat(norms)


def score_layer(gates: GateRows, layer: int, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, norms)`` of one layer's gate rows, scored :data:`SCORE_BLOCK_ROWS` rows at a time."""
    return score_row_blocks(gates.row_blocks(layer, SCORE_BLOCK_ROWS), direction)


def activation_scores(
    undesired: torch.Tensor,
    benign: torch.Tensor,
    down_columns: torch.Tensor,
    vector: torch.Tensor,
    readout: torch.Tensor,
) -> torch.Tensor:
    """Per row of one layer: how much a unit move of the row along ``vector`` lowers the MLP output's component
    along ``readout`` (the probe direction) on undesired tokens, beyond what it does on benign ones:
    ``-((S_undesired - S_benign)_r . v) * (down_r . p)``, S from :func:`.diagnostics.gate_sensitivities`.
    Rows where the push would raise the undesired readout, or act on benign text as much, score low."""
    unit = readout.float() / readout.float().norm().clamp_min(1e-12)
    return -((undesired - benign).float() @ vector.float()) * (down_columns.float() @ unit)


def mean_row_norm(layer_norm_means: Sequence[torch.Tensor]) -> float:
    """The mean over layers of each layer's mean gate-row norm (the normalised step's unit)."""
    return float(torch.stack(list(layer_norm_means)).mean())


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


class RunningTopK:
    """The global top-``k`` gate rows of the layers added so far, in O(k) memory.

    Rows are ordered by score (descending), ties by (layer, row), so the selection is a function of
    the scores alone and does not depend on the order the layers arrive in. With
    ``max_rows_per_layer`` at most that many rows of any one layer are candidates.
    """

    def __init__(self, k: int, rows_per_layer: int, max_rows_per_layer: int | None = None):
        self.k = k
        self.rows_per_layer = rows_per_layer
        self.max_rows_per_layer = max_rows_per_layer
        self.candidates = 0  # rows that could have been chosen, over every layer added
        self._layers: set[int] = set()
        self._layer = torch.empty(0, dtype=torch.long)
        self._row = torch.empty(0, dtype=torch.long)
        self._score = torch.empty(0, dtype=torch.float32)

    def add(self, layer: int, scores: torch.Tensor) -> None:
        if layer in self._layers:
            raise SurgeryError(f"layer {layer} was scored twice")
        if len(scores) != self.rows_per_layer:
            raise SurgeryError(f"layer {layer} has {len(scores)} gate rows, expected {self.rows_per_layer}")
        self._layers.add(layer)
        scores = scores.float().cpu()
        order = torch.sort(scores, descending=True, stable=True).indices  # ties: lower row first
        if self.max_rows_per_layer is not None:
            order = order[: self.max_rows_per_layer]
        self.candidates += len(order)
        order = order[: self.k]  # rows past the layer's own top k can never make the global top k
        layer_ids = torch.cat([self._layer, torch.full((len(order),), layer, dtype=torch.long)])
        row_ids = torch.cat([self._row, order])
        all_scores = torch.cat([self._score, scores[order]])
        # lexicographic tie-break: sort by (layer, row) first, then stably by score
        tie_order = torch.sort(layer_ids * self.rows_per_layer + row_ids, stable=True).indices
        by_score = torch.sort(all_scores[tie_order], descending=True, stable=True).indices
        chosen = tie_order[by_score[: self.k]]
        self._layer, self._row, self._score = layer_ids[chosen], row_ids[chosen], all_scores[chosen]

    def selection(self) -> RegionSelection:
        if not self._layers:
            raise SurgeryError("no layers to select gate rows from")
        if self.k > self.candidates:
            raise InfeasibleEdit(
                f"top_k {self.k} exceeds the {self.candidates} candidate rows (layer range / per-layer cap too tight)"
            )
        rows = {
            layer: torch.sort(self._row[self._layer == layer]).values for layer in sorted(set(self._layer.tolist()))
        }
        return RegionSelection(rows=rows, rows_per_layer_total=self.rows_per_layer)


@dataclass(frozen=True)
class GateScan:
    """What one pass over the gate rows yields: the selected rows and the mean gate-row norm."""

    regions: RegionSelection
    mean_row_norm: float


Directions = torch.Tensor | dict[int, torch.Tensor]  # one direction, or one per layer


def scan_gates(
    gates: GateRows,
    direction: Directions,
    top_k: int | float,
    max_rows_per_layer: int | None = None,
    layers: list[int] | tuple[int, int] | None = None,
    progress: bool = False,
    row_scores: dict[int, torch.Tensor] | None = None,
) -> GateScan:
    """Score every gate row of the chosen layers block by block, keep the running global top-K and
    the mean row norm: one pass, whether ``gates`` is a loaded model or checkpoint shards.
    ``direction`` may give each layer its own vector; ``row_scores`` (layer -> one score per row), when
    given, replace the ``-cos`` scores (region_scoring: activation)."""
    k = resolve_k(top_k, gates.num_layers * gates.rows_per_layer)
    chosen_layers = layer_range(gates.num_layers, layers)
    top = RunningTopK(k, gates.rows_per_layer, max_rows_per_layer)
    layer_norm_means = []
    with torch.no_grad():
        for layer in tqdm(chosen_layers, desc="scoring gate rows", unit="layer", disable=not progress):
            layer_direction = direction[layer] if isinstance(direction, dict) else direction
            scores, norms = score_layer(gates, layer, layer_direction)
            top.add(layer, scores if row_scores is None else row_scores[layer])
            layer_norm_means.append(norms.mean())
    return GateScan(top.selection(), mean_row_norm(layer_norm_means))


def select_regions(
    model: nn.Module | GateRows,
    direction: Directions,
    top_k: int | float,
    max_rows_per_layer: int | None = None,
    layers: list[int] | tuple[int, int] | None = None,
) -> RegionSelection:
    return scan_gates(architectures.gates_of(model), direction, top_k, max_rows_per_layer, layers).regions
