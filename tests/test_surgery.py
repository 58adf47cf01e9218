import pytest
import torch
from helpers import PROBE_META, make_tiny

from surgery_plugin import (
    SurgeryError,
    SurgeryHyperParams,
    apply_edit,
    apply_surgery_to_model,
    execute_surgery,
    revert_edit,
)
from surgery_plugin.core import architectures
from surgery_plugin.core.probe import Probe


def _probe(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(architectures.hidden_size(model), generator=g)
    return Probe(weight=torch.stack([-v, v]), bias=torch.zeros(2), metadata={"model": "tiny"})


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# each family's gate rows, written out from its weight layout (not through architectures): (name, rows of weight)
GATES = {
    "llama": ("model.layers.{}.mlp.gate_proj.weight", lambda w: w),
    "gpt2": ("transformer.h.{}.mlp.c_fc.weight", lambda w: w.T),  # Conv1D: (in, out), a row is a column
    "phi3": ("model.layers.{}.mlp.gate_up_proj.weight", lambda w: w[: w.shape[0] // 2]),  # fused: gate first
}


def _gate_rows(state, family, layer):
    name, rows = GATES[family]
    return rows(state[name.format(layer)])


def test_execute_surgery_touches_nothing():
    model = make_tiny("llama")
    before = _state(model)
    edit = execute_surgery(model, _probe(model), SurgeryHyperParams(top_k=20, alpha=0.7))
    assert edit.regions.num_rows == 20
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_moves_exactly_the_selected_rows_by_alpha_times_the_probe():
    model = make_tiny("llama")
    probe = _probe(model)
    before = _state(model)
    edit = execute_surgery(model, probe, SurgeryHyperParams(top_k=20, alpha=0.7))
    apply_edit(model, edit)
    after = _state(model)
    for layer in range(3):
        rows_before, rows_after = _gate_rows(before, "llama", layer), _gate_rows(after, "llama", layer)
        mask = edit.regions.row_mask(layer)
        assert torch.equal(rows_after[~mask], rows_before[~mask])
        assert torch.equal(rows_after[mask], rows_before[mask] + 0.7 * probe.direction)
    assert all(torch.equal(before[k], v) for k, v in after.items() if "gate_proj" not in k)


def test_each_layers_change_is_rank_one():
    model = make_tiny("llama")
    before = _state(model)
    edit = execute_surgery(model, _probe(model), SurgeryHyperParams(top_k=20, alpha=0.7))
    apply_edit(model, edit)
    for layer in edit.layers:
        delta = _gate_rows(_state(model), "llama", layer) - _gate_rows(before, "llama", layer)
        assert torch.linalg.matrix_rank(delta) == 1, layer


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", list(GATES))
def test_update_is_computed_in_float32_and_cast_once(dtype, family):
    model = make_tiny(family, dtype=dtype)
    probe = _probe(model)
    before = _state(model)
    edit = execute_surgery(model, probe, SurgeryHyperParams(top_k=30, alpha=1.3))
    apply_edit(model, edit)
    step = torch.tensor(1.3, dtype=torch.float32)
    for layer, rows in edit.regions.rows.items():
        want = (_gate_rows(before, family, layer)[rows].float() + step * probe.direction.float()).to(dtype)
        assert torch.equal(_gate_rows(_state(model), family, layer)[rows], want), layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", list(GATES))
def test_revert_is_bitwise(dtype, family):
    model = make_tiny(family, dtype=dtype)
    before = _state(model)
    edit = execute_surgery(model, _probe(model), SurgeryHyperParams(top_k=30, alpha=1.3))
    originals = apply_edit(model, edit)
    assert set(originals) == {GATES[family][0].format(layer) for layer in edit.layers}
    revert_edit(model, originals)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_revert_refuses_a_parameter_the_model_lacks():
    model = make_tiny("llama")
    with pytest.raises(SurgeryError, match="cannot restore 'nope.weight'"):
        revert_edit(model, {"nope.weight": torch.zeros(1)})


@pytest.fixture
def probe_file(tmp_path):
    model = make_tiny("llama")
    probe = _probe(model)
    probe.metadata.update(PROBE_META, hidden_size=32)
    return probe.save(tmp_path / "p.safetensors")


def test_apply_surgery_to_model_with_copy_leaves_the_input_alone(probe_file):
    model = make_tiny("llama")
    hp = SurgeryHyperParams(probe_path=str(probe_file), top_k=10, alpha=1.0)
    before = _state(model)
    edited, weights_copy = apply_surgery_to_model(model, None, [], hp, copy=True, return_orig_weights=True)
    assert edited is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert weights_copy and all(k.endswith("gate_proj.weight") for k in weights_copy)
    assert all(torch.equal(before[k], v) for k, v in weights_copy.items()), "the originals are the copy's"
    assert any(not torch.equal(before[k], v) for k, v in edited.state_dict().items())


def test_apply_surgery_to_model_without_copy_edits_in_place_like_apply_edit(probe_file):
    model, reference = make_tiny("llama"), make_tiny("llama")
    hp = SurgeryHyperParams(probe_path=str(probe_file), top_k=10, alpha=1.0)
    same, no_copy = apply_surgery_to_model(model, None, [], hp)
    assert same is model and no_copy == {}, "no originals unless return_orig_weights"
    apply_edit(reference, execute_surgery(reference, Probe.load(probe_file), hp))
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k


def test_normalized_step_is_alpha_times_the_mean_gate_row_norm():
    model = make_tiny("llama")
    probe = _probe(model)
    edit = execute_surgery(model, probe, SurgeryHyperParams(top_k=5, alpha=0.25, normalize=True))
    # mean over layers of each layer's mean row norm, from the weights themselves
    state = _state(model)
    layer_means = [torch.linalg.vector_norm(_gate_rows(state, "llama", i), dim=1).mean() for i in range(3)]
    assert edit.step == pytest.approx(0.25 * float(torch.stack(layer_means).mean()), rel=1e-6)
    torch.testing.assert_close(edit.direction, probe.direction / probe.direction.norm())


def test_normalized_step_uses_only_the_selected_layers():
    model = make_tiny("llama")
    with torch.no_grad():  # layer 0's rows 10 x longer: the mean over layers 1, 2 must not see them
        model.model.layers[0].mlp.gate_proj.weight.mul_(10)
    edit = execute_surgery(
        model, _probe(model), SurgeryHyperParams(top_k=5, alpha=0.5, normalize=True, layer_range=[1, 3])
    )
    state = _state(model)
    layer_means = [torch.linalg.vector_norm(_gate_rows(state, "llama", i), dim=1).mean() for i in (1, 2)]
    assert edit.step == pytest.approx(0.5 * float(torch.stack(layer_means).mean()), rel=1e-6)
    assert set(edit.layers) <= {1, 2}


def test_normalized_edit_does_not_depend_on_the_probes_length():
    model = make_tiny("llama")
    probe = _probe(model)
    hp = SurgeryHyperParams(top_k=5, alpha=0.25, normalize=True)
    edit = execute_surgery(model, probe, hp)
    longer = execute_surgery(model, Probe(weight=probe.weight * 7, bias=probe.bias), hp)
    assert longer.step == edit.step
    assert {k: v.tolist() for k, v in longer.regions.rows.items()} == {
        k: v.tolist() for k, v in edit.regions.rows.items()
    }
    torch.testing.assert_close(longer.direction, edit.direction)


def test_raw_step_is_alpha_and_direction_the_raw_probe():
    model = make_tiny("llama")
    probe = _probe(model)
    edit = execute_surgery(model, probe, SurgeryHyperParams(top_k=5, alpha=2.0))
    assert edit.step == 2.0 and torch.equal(edit.direction, probe.direction)


def test_with_alpha_rescales_the_step():
    model = make_tiny("llama")
    edit = execute_surgery(model, _probe(model), SurgeryHyperParams(top_k=5, alpha=2.0, normalize=True))
    rescaled = edit.with_alpha(-1.0)
    assert rescaled.step == pytest.approx(-edit.step / 2)
    assert rescaled.alpha == -1.0 and rescaled.metadata["alpha"] == -1.0
    assert rescaled.regions is edit.regions and torch.equal(rescaled.direction, edit.direction)


def test_an_alpha_0_edit_cannot_be_rescaled():
    model = make_tiny("llama")
    edit = execute_surgery(model, _probe(model), SurgeryHyperParams(top_k=5, alpha=2.0))
    with pytest.raises(SurgeryError, match="cannot rescale an edit made with alpha 0"):
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


def test_variants_without_statistics_are_refused():
    model = make_tiny("llama")
    with pytest.raises(SurgeryError, match="need statistics of benign text"):
        execute_surgery(model, _probe(model), SurgeryHyperParams(top_k=5, region_scoring="gate_contrast"))
