"""Outputs written before the reshaping still load (issue 18, item 10).

``tests/data/legacy/`` was written by the code at commit 2cab502 (before manifests, ``stack.json``,
``edit.json``) for ``make_tiny("llama")``: a probe, an adapter, a stack of two adapters and three saved
edits of ``surgery compare``. The new loaders must read each and give the same model as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_tiny

from surgery_plugin import SurgeryHyperParams, apply_edit, execute_surgery, load_edited, merge_into
from surgery_plugin.core.probe import Probe
from surgery_plugin.io.files import output_kind
from surgery_plugin.io.saved_edits import load_saved_edit, read_edit_record
from surgery_plugin.io.stack import load_stack, read_stack

LEGACY = Path(__file__).parent / "data" / "legacy"
HPARAMS = SurgeryHyperParams(top_k=6, alpha=0.5, normalize=True)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("probe.safetensors", "probe"),
        ("adapter", "adapter"),
        ("stack", "stack"),
        ("saved_surgery", "adapter"),
        ("saved_prompt", "saved_edit"),
        ("saved_tensors", "saved_edit"),
    ],
)
def test_old_outputs_are_recognised_as_their_kind(name, kind):
    assert output_kind(LEGACY / name) == kind


def test_an_old_probe_loads_with_its_direction():
    probe = Probe.load(LEGACY / "probe.safetensors")
    torch.manual_seed(0)
    assert torch.equal(probe.direction, torch.randn(32))
    assert probe.metadata["data"] == "legacy"


def test_an_old_adapter_merges_into_the_same_weights_as_todays_edit():
    probe = Probe.load(LEGACY / "probe.safetensors")
    merged, edited = make_tiny("llama"), make_tiny("llama")
    merge_into(merged, LEGACY / "adapter")
    apply_edit(edited, execute_surgery(edited, probe, HPARAMS))
    for (name, a), (_, b) in zip(merged.named_parameters(), edited.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_an_old_adapter_loads_through_peft_and_changes_the_logits():
    model = load_edited(make_tiny("llama"), LEGACY / "adapter")
    ids = torch.arange(2, 18)[None]
    with torch.no_grad():
        edited = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.equal(edited, base)
    assert model.surgery_records["default"]["alpha"] == 0.5


def test_an_old_stack_loads_both_adapters_active():
    assert read_stack(LEGACY / "stack")["adapters"] == ["toxicity", "attitude"]
    model = load_stack(make_tiny("llama"), LEGACY / "stack")
    assert sorted(model.peft_config) == ["attitude", "toxicity"]
    assert sorted(model.base_model.active_adapter) == ["attitude", "toxicity"]


@pytest.mark.parametrize(
    "name, kind", [("saved_surgery", "surgery"), ("saved_prompt", "prompt"), ("saved_tensors", "tensors")]
)
def test_old_saved_edits_load(name, kind):
    record = read_edit_record(LEGACY / name)
    assert record["kind"] == kind
    model = make_tiny("llama")
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    loaded, record = load_saved_edit(model, LEGACY / name)
    if kind == "tensors":
        after = loaded.model.layers[1].mlp.down_proj.weight
        assert torch.equal(after[0], before[0] + 0.25) and torch.equal(after[1:], before[1:])
    if kind == "prompt":
        assert record["instruction"] == "Be kind."
