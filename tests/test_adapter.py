import json

import pytest
import torch
from helpers import make_tiny

from surgery_plugin import (
    SurgeryError,
    SurgeryHyperParams,
    apply_edit,
    compose,
    execute_surgery,
    export_adapter,
    load_edited,
    merge_into,
    revert_edit,
    set_alpha,
)
from surgery_plugin.core import architectures
from surgery_plugin.core.probe import Probe

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 60, 12, 7, 3]])


def _edit(model, alpha=1.5, top_k=25, seed=1, layer_range=None):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(architectures.hidden_size(model), generator=g)
    probe = Probe(weight=torch.stack([-v, v]), bias=torch.zeros(2))
    return execute_surgery(model, probe, SurgeryHyperParams(top_k=top_k, alpha=alpha, layer_range=layer_range))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.clone()


FAMILIES = ["llama", "gpt2", "phi3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_config_is_a_rank_1_lora_of_the_edited_gates(family, tmp_path):
    model = make_tiny(family)
    edit = _edit(model, layer_range=[1, 3])
    out = export_adapter(edit, model, tmp_path / "adapter", base_model_name=f"tiny-{family}")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["task_type"], config["bias"], config["r"], config["lora_alpha"]) == ("CAUSAL_LM", "none", 1, 1)
    assert not config.get("modules_to_save") and config["base_model_name_or_path"] == f"tiny-{family}"
    assert sorted(config["target_modules"]) == sorted(edit.module_names[layer] for layer in edit.layers)
    assert all(".0." not in name for name in config["target_modules"]), "only layers with selected rows get a LoRA"


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reproduces_in_place_edit(family, tmp_path):
    model = make_tiny(family)
    edit = _edit(model, layer_range=[1, 3])
    out = export_adapter(edit, model, tmp_path / "adapter", base_model_name=f"tiny-{family}")
    originals = apply_edit(model, edit)
    in_place = _logits(model)
    revert_edit(model, originals)
    assert (_logits(load_edited(model, out)) - in_place).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_adapter_is_the_base_model(family, tmp_path):
    model = make_tiny(family)
    base = _logits(model)
    out = export_adapter(_edit(model), model, tmp_path / "adapter", base_model_name=f"tiny-{family}")
    peft_model = load_edited(model, out)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_in_place_bitwise(dtype, tmp_path):
    model = make_tiny("llama", dtype=dtype)
    edit = _edit(model)
    out = export_adapter(edit, model, tmp_path / "a", base_model_name="tiny-llama")
    originals = apply_edit(model, edit)
    in_place = {k: v.clone() for k, v in model.state_dict().items()}
    revert_edit(model, originals)
    merge_into(model, out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, in_place[k]), k


@pytest.fixture
def exported(tmp_path):
    """An edit of a tiny llama, its adapter, and the logits of the edit applied in place."""
    model = make_tiny("llama")
    edit = _edit(model)
    out = export_adapter(edit, model, tmp_path / "a", base_model_name="tiny-llama")
    apply_edit(model, edit)
    return edit, out, _logits(model)


def test_peft_from_pretrained_loads_the_adapter(exported):
    from peft import PeftModel

    _, out, in_place = exported
    via_peft = PeftModel.from_pretrained(make_tiny("llama"), str(out))
    assert (_logits(via_peft) - in_place).abs().max() <= 1e-5


def test_transformers_load_adapter_loads_the_adapter(exported):
    _, out, in_place = exported
    plain = make_tiny("llama")
    plain.load_adapter(str(out))
    assert (_logits(plain) - in_place).abs().max() <= 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0, -1.0])
def test_runtime_alpha_equals_fresh_edit(tmp_path, alpha):
    model = make_tiny("llama")
    edit = _edit(model, alpha=1.0)
    peft_model = load_edited(model, export_adapter(edit, model, tmp_path / "a", base_model_name="tiny-llama"))
    set_alpha(peft_model, alpha)
    fresh = make_tiny("llama")
    if alpha != 0:  # alpha 0 is the unedited model
        apply_edit(fresh, edit.with_alpha(alpha))
    assert (_logits(peft_model) - _logits(fresh)).abs().max() <= 1e-5


@pytest.fixture
def two_adapters(tmp_path):
    model = make_tiny("llama")
    first, second = _edit(model, seed=1), _edit(model, seed=2, alpha=-0.8)
    a = export_adapter(first, model, tmp_path / "a", base_model_name="tiny-llama")
    b = export_adapter(second, model, tmp_path / "b", base_model_name="tiny-llama")
    peft_model = load_edited(model, a, adapter_name="detox")
    return load_edited(peft_model, b, adapter_name="other"), first, second


def test_two_adapters_stack_like_two_in_place_edits(two_adapters):
    peft_model, first, second = two_adapters
    reference = make_tiny("llama")
    apply_edit(reference, first)
    apply_edit(reference, second)
    compose(peft_model, ["detox", "other"])
    assert (_logits(peft_model) - _logits(reference)).abs().max() <= 1e-5


def test_compose_refuses_an_adapter_not_loaded(two_adapters):
    with pytest.raises(SurgeryError, match="not loaded"):
        compose(two_adapters[0], ["detox", "nope"])


@pytest.fixture
def adapter(tmp_path):
    model = make_tiny("llama")
    return export_adapter(_edit(model), model, tmp_path / "a", base_model_name="tiny-llama")


def test_adapter_refuses_a_base_with_other_weights(adapter):
    with pytest.raises(SurgeryError, match="was made for 'tiny-llama' but 'tiny-llama' has other weights"):
        load_edited(make_tiny("llama", seed=7), adapter)


def test_force_overrides_the_fingerprint_check_only(adapter):
    load_edited(make_tiny("llama", seed=7), adapter, force=True)
    with pytest.raises(SurgeryError, match="does not fit 'tiny-gpt2'"):
        load_edited(make_tiny("gpt2"), adapter, force=True)


def test_corrupt_adapter_weights_are_named(adapter):
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SurgeryError, match="corrupt"):
        load_edited(make_tiny("llama"), adapter)


def test_a_folder_without_an_adapter_is_refused(tmp_path):
    with pytest.raises(SurgeryError, match="not a surgery adapter"):
        load_edited(make_tiny("llama"), tmp_path)
    with pytest.raises(SurgeryError, match="adapter folder not found"):
        load_edited(make_tiny("llama"), tmp_path / "missing")


def test_export_refuses_to_clobber_a_folder(tmp_path):
    model = make_tiny("llama")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(SurgeryError, match="not a surgery output"):
        export_adapter(_edit(model), model, tmp_path / "busy", base_model_name="tiny-llama", overwrite=True)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"], "no temp folders left"


def test_export_records_the_edit(tmp_path):
    model = make_tiny("llama")
    export_adapter(_edit(model), model, tmp_path / "fresh", base_model_name="tiny-llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"], "no temp folders left"
    record = json.loads((tmp_path / "fresh" / "surgery.json").read_text())
    assert record["alpha"] == 1.5 and record["num_rows"] == 25 and len(record["gate_fingerprint"]) == 3
