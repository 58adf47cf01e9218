"""Gate diagnostics (core/diagnostics.py): exact values on hand-made rows and inputs, and a tiny model run."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CharTokenizer, make_tiny
from torch import nn

from surgery_plugin.core import architectures
from surgery_plugin.core.diagnostics import (
    ClassSums,
    accumulate,
    activation_minimum,
    activation_slope,
    gate_diagnostics,
    layer_report,
)
from surgery_plugin.core.features import pooled_states


def test_activation_minimum_of_silu_gelu_and_relu():
    # SiLU's minimum solves 1 + x (1 - sigmoid(x)) = 0: x = -1.27846...
    silu_min = activation_minimum(nn.SiLU())
    assert silu_min == pytest.approx(-1.2784645, abs=1e-5)
    s = 1 / (1 + math.exp(-silu_min))
    assert 1 + silu_min * (1 - s) == pytest.approx(0, abs=1e-6)
    assert activation_minimum(nn.GELU(approximate="tanh")) == pytest.approx(-0.7518, abs=2e-3)
    assert activation_minimum(nn.ReLU()) is None  # non-decreasing: a push up never lowers it


def test_activation_slope_is_the_derivative():
    x = torch.tensor([-3.0, -1.2784645, 0.0, 2.0], dtype=torch.float64)
    sig = torch.sigmoid(x)
    expected = sig * (1 + x * (1 - sig))
    assert torch.allclose(activation_slope(nn.SiLU(), x), expected)
    assert abs(float(activation_slope(nn.SiLU(), x)[1])) < 1e-6  # flat at the minimum


def test_accumulate_and_report_on_hand_made_rows():
    silu = nn.SiLU()
    minimum = activation_minimum(silu)
    rows = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # row 0 reads x0, row 1 reads -x1
    vector = torch.tensor([0.0, 1.0])  # the edit pushes along x1
    undesired_inputs = torch.tensor([[0.5, 2.0], [-0.5, 2.0]])  # row 1's pre-activation: -2 (below -1.278)
    benign_inputs = torch.tensor([[0.5, 0.0], [1.5, 0.0]])
    undesired, benign = ClassSums(), ClassSums()
    # in two calls: the sums must not depend on how tokens arrive
    accumulate(undesired, undesired_inputs[:1], rows, vector, 0.5, silu, minimum)
    accumulate(undesired, undesired_inputs[1:], rows, vector, 0.5, silu, minimum)
    accumulate(benign, benign_inputs, rows, vector, 0.5, silu, minimum)
    report = layer_report(torch.tensor([0.0, 3.0]), vector, 0.5, undesired, benign, minimum)
    # contrast = mean undesired input - mean benign input = (0, 2) - (1, 0) = (-1, 2)
    assert report["contrast_norm"] == pytest.approx(math.sqrt(5))
    assert report["cos_probe_contrast"] == pytest.approx(2 / math.sqrt(5))
    assert report["rows_below_minimum"] == pytest.approx(0.5)  # row 1 (mean -2), not row 0 (mean 0)
    assert report["row_tokens_below_minimum"] == pytest.approx(0.5)  # 2 of 4 (row, token) pairs

    def slope(pre, shift):
        sig = 1 / (1 + math.exp(-pre))
        return sig * (1 + pre * (1 - sig)) * shift

    def silu_f(x):
        return x / (1 + math.exp(-x))

    # undesired tokens: pre = (0.5, -2), (-0.5, -2); v . x = 2 for both
    expected_slope = (slope(0.5, 2) + slope(-2, 2) + slope(-0.5, 2) + slope(-2, 2)) / 4
    assert report["slope_undesired"] == pytest.approx(expected_slope)
    assert slope(-2, 2) < 0 < slope(0.5, 2)  # below SiLU's minimum the push lowers the output, above it raises it
    change = sum(silu_f(p + 0.5 * 2) - silu_f(p) for p in (0.5, -2, -0.5, -2)) / 4
    assert report["change_at_step_undesired"] == pytest.approx(change)
    assert report["slope_benign"] == 0.0  # benign tokens (v . x = 0) do not move at all
    assert report["mean_preactivation_undesired"] == pytest.approx((0.5 - 2 - 0.5 - 2) / 4)


def test_relu_reports_no_share_below_minimum():
    sums = {k: ClassSums() for k in ("u", "b")}
    rows, vector = torch.eye(2), torch.tensor([1.0, 0.0])
    for s, x in zip(sums.values(), (torch.ones(3, 2), -torch.ones(3, 2)), strict=True):
        accumulate(s, x, rows, vector, 1.0, nn.ReLU(), None)
    report = layer_report(vector, vector, 1.0, sums["u"], sums["b"], None)
    assert report["rows_below_minimum"] is None and report["row_tokens_below_minimum"] is None


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_gate_diagnostics_on_a_tiny_model(family):
    model, tok = make_tiny(family), CharTokenizer()
    texts = {"undesired": ["you are awful", "bad bad words"], "benign": ["a calm day", "the weather"]}
    regions = {0: torch.tensor([1, 3]), 2: torch.tensor([0])}
    hidden = architectures.hidden_size(model)
    vectors = {layer: torch.randn(hidden, generator=torch.Generator().manual_seed(layer)) for layer in regions}
    probe = torch.randn(hidden, generator=torch.Generator().manual_seed(9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gate_diagnostics(model, tok, regions, vectors, 0.3, probe, texts, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # read, never written
    assert set(result["per_layer"]) == {"0", "2"}
    # the contrast equals the token-weighted gate-input means the pooled features give
    _, gates = pooled_states(model, tok, texts["undesired"] + texts["benign"], (), [2], progress=False)
    lengths = torch.tensor([len(t) for t in texts["undesired"] + texts["benign"]], dtype=torch.float32)[:, None]
    u = (gates[2][:2] * lengths[:2]).sum(0) / lengths[:2].sum()
    b = (gates[2][2:] * lengths[2:]).sum(0) / lengths[2:].sum()
    assert result["per_layer"]["2"]["contrast_norm"] == pytest.approx(float((u - b).norm()), rel=1e-4)
    assert result["per_layer"]["0"]["rows"] == 2
    if family == "gpt2":  # gelu_new is non-monotone too
        assert result["activation_minimum"] == pytest.approx(-0.7518, abs=2e-3)


# ---------------------------------------------------------------------------- region_scoring: activation


def test_sensitivity_sums_and_activation_scores_on_hand_made_rows():
    from surgery_plugin.core.architectures import MlpReadout
    from surgery_plugin.core.diagnostics import sensitivity_sums
    from surgery_plugin.core.regions import activation_scores

    silu = nn.SiLU()
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    up = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    readout = MlpReadout(torch.tensor([0.5, 0.0]), up, torch.tensor([0.0, 1.0]), torch.eye(2))
    got = sensitivity_sums(x, gate, readout, silu)

    def d_silu(z):
        s = 1 / (1 + math.exp(-z))
        return s * (1 + z * (1 - s))

    want = torch.zeros(2, 2, dtype=torch.float64)
    for token in x.tolist():
        pre = [token[0] + 0.5, token[1]]
        upx = [token[1], 2 * token[0] + 1]
        for r in range(2):
            want[r] += d_silu(pre[r]) * upx[r] * torch.tensor(token, dtype=torch.float64)
    torch.testing.assert_close(got, want)
    # ungated: the activation's slope alone
    plain = sensitivity_sums(x, gate, MlpReadout(torch.zeros(2), None, None, torch.eye(2)), silu)
    want_plain = sum(
        torch.tensor([[d_silu(t[0]) * t[0], d_silu(t[0]) * t[1]], [d_silu(t[1]) * t[0], d_silu(t[1]) * t[1]]])
        for t in x.tolist()
    )
    torch.testing.assert_close(plain, want_plain.double())
    # scores: -((S_u - S_b) . v) * (down . p / |p|)
    s_u, s_b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    down = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    scores = activation_scores(s_u, s_b, down, torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(scores, torch.tensor([-0.5 * 1.0, -2.0 * -1.0]))


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_gate_sensitivities_predict_the_mlp_output_change(family):
    """A small move of one gate row along v changes the MLP output along p by t (S . v)(down . p): checked against
    the model's own MLP on the captured gate inputs (finite difference)."""
    from surgery_plugin.core.architectures import gate_rows, mlp_readout
    from surgery_plugin.core.diagnostics import gate_sensitivities
    from surgery_plugin.core.features import state_batches

    model, tok = make_tiny(family), CharTokenizer()
    texts = ["you are awful", "a calm sunny day", "zz"]
    layer, row = 1, 3
    sens = gate_sensitivities(model, tok, texts, [layer], progress=False)[layer]
    hidden = architectures.hidden_size(model)
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    p = torch.randn(hidden, generator=torch.Generator().manual_seed(2))
    predicted_slope = float(sens[row] @ v) * float(mlp_readout(model, layer).down_columns[row] @ p)
    tokens = torch.cat(
        [g[layer][m.bool()] for _, _, g, m in state_batches(model, tok, texts, (), [layer], progress=False)]
    )
    block = architectures.decoder_layers(model)[layer]
    mlp = block.mlp if family != "opt" else None

    def mean_readout() -> float:
        with torch.no_grad():
            return float((mlp(tokens) @ p).mean())

    t = 1e-3
    before = mean_readout()
    with torch.no_grad():
        gate_rows(model, layer)[row] += t * v
    after = mean_readout()
    assert (after - before) / t == pytest.approx(predicted_slope, rel=2e-2, abs=1e-4)


def test_activation_scoring_selects_the_top_rows_of_its_scores():
    from surgery_plugin import SurgeryHyperParams, execute_surgery
    from surgery_plugin.core.diagnostics import gate_sensitivities
    from surgery_plugin.core.probe import Probe
    from surgery_plugin.core.reference import ReferenceStats
    from surgery_plugin.core.regions import activation_scores

    model, tok = make_tiny("llama"), CharTokenizer()
    undesired_texts, benign_texts = ["you stupid idiot", "i hate you"], ["a kind word", "nice weather"]
    layers = [0, 1, 2]
    s_u = gate_sensitivities(model, tok, undesired_texts, layers, progress=False)
    s_b = gate_sensitivities(model, tok, benign_texts, layers, progress=False)
    down = {layer: architectures.mlp_readout(model, layer).down_columns for layer in layers}
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    probe = Probe(weight=torch.stack([-v, v]), bias=torch.zeros(2))
    stats = ReferenceStats(undesired_sensitivities=s_u, benign_sensitivities=s_b, down_columns=down)
    hp = SurgeryHyperParams(top_k=7, alpha=0.5, normalize=True, region_scoring="activation")
    edit = execute_surgery(model, probe, hp, stats)
    unit = v / v.norm()
    scores = [
        (float(s), layer, r)
        for layer in layers
        for r, s in enumerate(activation_scores(s_u[layer], s_b[layer], down[layer], unit, unit))
    ]
    best = {(layer, r) for _, layer, r in sorted(scores, key=lambda t: (-t[0], t[1], t[2]))[:7]}
    assert {(layer, int(r)) for layer, rows in edit.regions.rows.items() for r in rows} == best
    assert edit.metadata["region_scoring"] == "activation"
