import pytest
import torch
from helpers import make_tiny

from surgery_plugin import (
    SurgeryError,
    SurgeryHyperParams,
    apply_edit,
    apply_surgery_to_model,
    execute_surgery,
    revert_edit,
)
from surgery_plugin.core import architectures
from surgery_plugin.core.edit import mean_gate_row_norm
from surgery_plugin.core.probe import Probe


def _probe(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(architectures.hidden_size(model), generator=g)
    return Probe(weight=torch.stack([-v, v]), bias=torch.zeros(2), metadata={"model": "tiny"})


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_execute_touches_nothing_and_apply_moves_exactly_the_selected_rows():
    model = make_tiny("llama")
    probe = _probe(model)
    before = _state(model)
    edit = execute_surgery(model, probe, SurgeryHyperParams(top_k=20, alpha=0.7))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert edit.regions.num_rows == 20
    apply_edit(model, edit)
    for layer in range(3):
        rows_before = before[f"model.layers.{layer}.mlp.gate_proj.weight"]
        rows_after = architectures.gate_rows(model, layer)
        mask = edit.regions.row_mask(layer)
        assert torch.equal(rows_after[~mask], rows_before[~mask])
        expected = rows_before[mask] + 0.7 * probe.direction
        assert torch.equal(rows_after[mask], expected)
    # each layer's change is rank one
    delta = (
        architectures.gate_rows(model, edit.layers[0]) - before[f"model.layers.{edit.layers[0]}.mlp.gate_proj.weight"]
    )
    assert torch.linalg.matrix_rank(delta) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_revert_is_bitwise_and_update_is_cast_once(dtype, family):
    model = make_tiny(family, dtype=dtype)
    before = _state(model)
    edit = execute_surgery(model, _probe(model), SurgeryHyperParams(top_k=30, alpha=1.3))
    originals = apply_edit(model, edit)
    assert set(originals) == {f"{edit.module_names[layer]}.weight" for layer in edit.layers}
    layer = edit.layers[0]
    rows = edit.regions.rows[layer]
    expected = before[f"{edit.module_names[layer]}.weight"].float()
    expected_rows = architectures.gate_rows_of_weight(expected, architectures.gate_spec(model))
    want = (expected_rows[rows] + edit.row_update()).to(dtype)
    assert torch.equal(architectures.gate_rows(model, layer)[rows], want)
    revert_edit(model, originals)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_apply_surgery_to_model_follows_easyedit_contract(tmp_path):
    model = make_tiny("llama")
    probe = _probe(model)
    probe.metadata.update(
        {k: 0 for k in ("layer", "pooling", "hidden_size", "n_train", "test_accuracy", "test_auc", "data", "seed")}
    )
    probe.metadata["hidden_size"] = 32
    path = probe.save(tmp_path / "p.safetensors")
    hp = SurgeryHyperParams(probe_path=str(path), top_k=10, alpha=1.0)
    before = _state(model)
    edited, weights_copy = apply_surgery_to_model(model, None, [], hp, copy=True, return_orig_weights=True)
    assert edited is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), (
        "copy=True must leave the input alone"
    )
    assert weights_copy and all(k.endswith("gate_proj.weight") for k in weights_copy)
    same, no_copy = apply_surgery_to_model(model, None, [], hp)
    assert same is model and no_copy == {}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_normalized_mode_steps_by_alpha_times_mean_row_norm():
    model = make_tiny("llama")
    probe = _probe(model)
    edit = execute_surgery(model, probe, SurgeryHyperParams(top_k=5, alpha=0.25, normalize=True))
    assert edit.direction.norm().item() == pytest.approx(1.0)
    assert edit.step == pytest.approx(0.25 * mean_gate_row_norm(model, [0, 1, 2]))
    # a longer probe gives the same edit when normalized
    longer = Probe(weight=probe.weight * 7, bias=probe.bias)
    edit2 = execute_surgery(model, longer, SurgeryHyperParams(top_k=5, alpha=0.25, normalize=True))
    torch.testing.assert_close(edit2.row_update(), edit.row_update())


def test_with_alpha_rescales_the_step():
    model = make_tiny("llama")
    edit = execute_surgery(model, _probe(model), SurgeryHyperParams(top_k=5, alpha=2.0))
    assert edit.with_alpha(-1.0).step == pytest.approx(-1.0)
    with pytest.raises(SurgeryError):
        edit.with_alpha(0.0).with_alpha(1.0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.full((32,), float("nan")), "NaN"),
        (torch.zeros(32), "all zeros"),
        (torch.ones(31), "hidden size 31 does not match the model's 32"),
    ],
)
def test_bad_probes_are_rejected(bad, message):
    model = make_tiny("llama")
    with pytest.raises(SurgeryError, match=message):
        execute_surgery(model, bad, SurgeryHyperParams(top_k=5))
