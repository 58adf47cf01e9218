"""Does the edit reach the gate, and does the push move the activation the way the method assumes?

The edit adds ``step * v_l`` to the selected gate rows ``r`` of layer ``l``; on a token whose gate input is
``x`` the row's pre-activation ``r . x`` moves by ``step * (v_l . x)`` and its output by
``act(r . x + step * v_l . x) - act(r . x)``. Per edited layer this module measures, on undesired and on
benign text (token level):

- ``d_l``, the mean gate input on undesired text minus that on benign text: ``cos(probe direction, d_l)``
  (is the probe, learned on one layer's residual stream, a direction this gate reads?) and ``|d_l|``;
- the share of selected rows whose mean pre-activation on undesired text lies below the activation's
  minimum (SiLU: x = -1.278; tanh-GELU: -0.752), where pushing the pre-activation up *lowers* the
  output, and the share of (row, token) pairs there;
- the slope ``act'(r . x) * (v_l . x)``: the change of the rows' output per unit step at step 0, and the
  finite change at the edit's own step, each averaged over rows and tokens.

:func:`accumulate` and :func:`layer_report` are pure; :func:`gate_diagnostics` runs the model (one forward
pass per batch through :func:`surgery_plugin.core.features.state_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import architectures
from .architectures import MlpReadout
from .features import state_batches

Activation = Callable[[torch.Tensor], torch.Tensor]


def activation_minimum(act: Activation, low: float = -8.0, high: float = 0.0, iterations: int = 80) -> float | None:
    """Where ``act`` has its minimum on ``[low, high]`` (golden-section search); None when ``act`` is
    non-decreasing there (ReLU, ...), so that no push upward can lower its output."""
    grid = torch.linspace(low, high, 801, dtype=torch.float64)
    values = act(grid)
    if bool((values[1:] >= values[:-1] - 1e-12).all()):
        return None
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    for _ in range(iterations):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = (float(act(torch.tensor([v], dtype=torch.float64))) for v in (c, d))
        if fc < fd:
            b = d
        else:
            a = c
    return (a + b) / 2


def activation_slope(act: Activation, x: torch.Tensor) -> torch.Tensor:
    """``act'(x)`` elementwise (autograd through the model's own activation module)."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(x).sum(), x)
    return grad.detach()


@dataclass
class ClassSums:
    """Running sums over the tokens of one text class, for one layer's selected rows."""

    tokens: int = 0
    input_sum: torch.Tensor | None = None  # (hidden,) float64
    preact_sum: torch.Tensor | None = None  # (rows,) float64: each row's pre-activation summed over tokens
    below_minimum: int = 0  # (row, token) pairs whose pre-activation is below the activation's minimum
    slope_sum: float = 0.0  # sum over rows and tokens of act'(r . x) * (v . x)
    change_sum: float = 0.0  # sum over rows and tokens of act(r . x + step * v . x) - act(r . x)
    rows: int = 0  # selected rows in the layer


def accumulate(
    sums: ClassSums,
    inputs: torch.Tensor,
    rows: torch.Tensor,
    vector: torch.Tensor,
    step: float,
    act: Activation,
    minimum: float | None,
    gate_bias: torch.Tensor | None = None,
) -> None:
    """Add the tokens ``inputs`` (tokens, hidden) of one class to ``sums``: ``rows`` (n, hidden) are the selected
    gate rows, ``vector`` the layer's edit vector ``v_l`` and ``step`` the edit's step."""
    inputs = inputs.detach().double()
    rows, vector = rows.detach().double(), vector.detach().double()
    pre = inputs @ rows.T  # (tokens, n)
    if gate_bias is not None:  # GPT-2 style gates add a bias before the activation
        pre = pre + gate_bias.double()
    shift = inputs @ vector  # (tokens,)
    sums.tokens += inputs.shape[0]
    sums.rows = rows.shape[0]
    total = inputs.sum(0)
    sums.input_sum = total if sums.input_sum is None else sums.input_sum + total
    row_total = pre.sum(0)
    sums.preact_sum = row_total if sums.preact_sum is None else sums.preact_sum + row_total
    if minimum is not None:
        sums.below_minimum += int((pre < minimum).sum())
    sums.slope_sum += float((activation_slope(act, pre) * shift[:, None]).sum())
    sums.change_sum += float((act(pre + step * shift[:, None]) - act(pre)).sum())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else None


def layer_report(
    probe_direction: torch.Tensor,
    vector: torch.Tensor,
    step: float,
    undesired: ClassSums,
    benign: ClassSums,
    minimum: float | None,
) -> dict:
    """One layer's diagnostics from the two classes' sums (see the module docstring)."""
    contrast = undesired.input_sum / undesired.tokens - benign.input_sum / benign.tokens
    pairs = {name: max(1, s.rows * s.tokens) for name, s in (("undesired", undesired), ("benign", benign))}
    report = {
        "cos_probe_contrast": _cos(probe_direction.double(), contrast),
        "cos_vector_contrast": _cos(vector.double(), contrast),
        "contrast_norm": float(contrast.norm()),
        "rows": undesired.rows,
        "step": step,
        "rows_below_minimum": None,
        "row_tokens_below_minimum": None,
    }
    if minimum is not None and undesired.rows:
        report["rows_below_minimum"] = float((undesired.preact_sum / undesired.tokens < minimum).double().mean())
        report["row_tokens_below_minimum"] = undesired.below_minimum / pairs["undesired"]
    for name, sums in (("undesired", undesired), ("benign", benign)):
        report[f"slope_{name}"] = sums.slope_sum / pairs[name]
        report[f"change_at_step_{name}"] = sums.change_sum / pairs[name]
        report[f"mean_preactivation_{name}"] = float(sums.preact_sum.sum()) / pairs[name] if sums.rows else None
    return report


def gate_tokens(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    batch_size: int,
    max_length: int,
    progress: bool,
    desc: str,
) -> Iterator[dict[int, torch.Tensor]]:
    """Per batch of ``texts``, each layer's gate inputs at the real tokens only, (tokens, hidden) float32, CPU."""
    for _, _, gate_inputs, mask in state_batches(
        model, tokenizer, texts, (), layers, batch_size, max_length, progress, desc=desc
    ):
        real = mask.bool()
        yield {layer: gate_inputs[layer].float().cpu()[real] for layer in layers}


@torch.no_grad()
def gate_diagnostics(
    model: nn.Module,
    tokenizer,
    regions: Mapping[int, torch.Tensor],
    vectors: Mapping[int, torch.Tensor],
    step: float,
    probe_direction: torch.Tensor,
    texts: Mapping[str, Sequence[str]],
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = True,
) -> dict:
    """Per layer of ``regions`` (layer -> selected row indices), :func:`layer_report` of the edit that adds
    ``step * vectors[layer]`` to those rows, on ``texts["undesired"]`` and ``texts["benign"]``; ``model`` is
    read, never written. Also returns the activation's minimum."""
    act = architectures.gate_activation(model)
    minimum = activation_minimum(act)
    gates = architectures.gates_of(model)
    layers = sorted(int(layer) for layer in regions)
    selected = {layer: gates.rows_at(layer, torch.as_tensor(regions[layer])) for layer in layers}
    biases = {layer: architectures.mlp_readout(model, layer).gate_bias[regions[layer]] for layer in layers}
    sums = {name: {layer: ClassSums() for layer in layers} for name in ("undesired", "benign")}
    for name in sums:
        batches = gate_tokens(
            model, tokenizer, texts[name], layers, batch_size, max_length, progress, f"gate inputs ({name})"
        )
        for by_layer in batches:
            for layer, tokens in by_layer.items():
                accumulate(
                    sums[name][layer],
                    tokens,
                    selected[layer],
                    vectors[layer].float(),
                    step,
                    act,
                    minimum,
                    biases[layer],
                )
    per_layer = {
        str(layer): layer_report(
            probe_direction.float(),
            vectors[layer].float(),
            step,
            sums["undesired"][layer],
            sums["benign"][layer],
            minimum,
        )
        for layer in layers
    }
    return {"activation_minimum": minimum, "per_layer": per_layer}


def sensitivity_sums(
    inputs: torch.Tensor, gate_rows: torch.Tensor, readout: MlpReadout, act: Activation
) -> torch.Tensor:
    """``sum over tokens of act'(g_r . x + b_r) * (up_r . x + c_r) * x`` for every row r, (rows, hidden) float64:
    with it, the change of row r's contribution to the MLP output per unit move of the row along ``v`` is
    ``(S_r . v) * down_r`` on these tokens, for any ``v`` (region_scoring: activation)."""
    x = inputs.detach().double()
    pre = x @ gate_rows.detach().double().T + readout.gate_bias.double()
    weight = activation_slope(act, pre)  # (tokens, rows)
    if readout.up_rows is not None:
        weight = weight * (x @ readout.up_rows.double().T + readout.up_bias.double())
    return weight.T @ x


@torch.no_grad()
def gate_sensitivities(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Per layer, :func:`sensitivity_sums` over every real token of ``texts`` divided by their number, float32."""
    act = architectures.gate_activation(model)
    gates = architectures.gates_of(model)
    layers = sorted(layers)
    readouts = {layer: architectures.mlp_readout(model, layer) for layer in layers}
    rows = {layer: gates.rows_at(layer, torch.arange(gates.rows_per_layer)) for layer in layers}
    sums = {layer: torch.zeros(gates.rows_per_layer, gates.hidden_size, dtype=torch.float64) for layer in layers}
    tokens = 0
    for by_layer in gate_tokens(
        model, tokenizer, texts, layers, batch_size, max_length, progress, "gate sensitivities"
    ):
        tokens += next(iter(by_layer.values())).shape[0]
        for layer, inputs in by_layer.items():
            sums[layer] += sensitivity_sums(inputs, rows[layer], readouts[layer], act)
    return {layer: (total / tokens).float() for layer, total in sums.items()}
