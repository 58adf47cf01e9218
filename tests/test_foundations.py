"""The shared building blocks: atomic writes, batching, the error helper, provenance, the PEFT key codec."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from helpers import make_tiny

from surgery_plugin import SurgeryHyperParams, execute_surgery
from surgery_plugin.core.batching import length_sorted_batches, pad
from surgery_plugin.core.probe import Probe
from surgery_plugin.errors import SurgeryError, first_line
from surgery_plugin.io.adapter import lora_tensors, parse_peft_key, peft_key, row_updates_of
from surgery_plugin.io.files import atomic_path, atomic_write, check_target
from surgery_plugin.models import resolve_device


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_whole_files_and_leaves_readable_modes(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and _mode(target) == 0o666 & ~_umask()
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "folder"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_writes_a_folder_whole_with_readable_modes(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    with atomic_path(target) as tmp:  # a folder, written whole, replaces an empty one
        tmp.mkdir()
        (tmp / "a.txt").write_text("a")
        os.chmod(tmp / "a.txt", 0o600)  # what safetensors does
    assert (target / "a.txt").read_text() == "a" and _mode(target / "a.txt") == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_check_target_refuses_what_is_not_an_output_of_the_kind_and_asks_for_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    assert check_target(tmp_path / "out", "adapter") == tmp_path / "out", "an empty folder is free"
    (tmp_path / "out" / "x").write_text("mine")
    with pytest.raises(SurgeryError, match="not a surgery output"):
        check_target(tmp_path / "out", "adapter", overwrite=True)
    (tmp_path / "out" / "x").unlink()
    (tmp_path / "out" / "surgery.json").write_text('{"kind": "adapter"}')
    with pytest.raises(SurgeryError, match="--overwrite"):
        check_target(tmp_path / "out", "adapter")
    assert check_target(tmp_path / "out", "adapter", overwrite=True) == tmp_path / "out"
    with pytest.raises(SurgeryError, match="kind 'adapter'"):
        check_target(tmp_path / "out", "stack", overwrite=True)


def test_length_sorted_batches_are_stable_and_complete():
    lengths = [3, 1, 3, 2, 1, 5]
    batches = list(length_sorted_batches(lengths, 2, progress=False))
    assert batches == [[1, 4], [3, 0], [2, 5]]
    with pytest.raises(ValueError):
        list(length_sorted_batches(lengths, 0, progress=False))


def test_pad_left_and_right():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_first_line_names_the_type_and_keeps_one_line():
    assert first_line(ValueError("bad thing\nsecond line")) == "ValueError: bad thing"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("x" * 500), limit=10) == "OSError: " + "x" * 10


def test_peft_key_codec_round_trips_and_rejects_other_names():
    key = peft_key("model.layers.3.mlp.gate_proj", "lora_B")
    assert key == "base_model.model.model.layers.3.mlp.gate_proj.lora_B.weight"
    assert parse_peft_key(key) == ("model.layers.3.mlp.gate_proj", "lora_B")
    for bad in (
        "model.layers.3.mlp.gate_proj.weight",
        "base_model.model.x.lora_C.weight",
        "base_model.model.lora_A.weight",
    ):
        with pytest.raises(SurgeryError, match="not a LoRA tensor name"):
            parse_peft_key(bad)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_adapter_tensors_decode_to_the_edits_rows_step_and_direction(family):
    model = make_tiny(family)
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    edit = execute_surgery(model, Probe(torch.stack([-v, v]), torch.zeros(2)), SurgeryHyperParams(top_k=17, alpha=0.9))
    decoded = {u.module_name: u for u in row_updates_of(lora_tensors(edit, model))}
    assert set(decoded) == {edit.module_names[layer] for layer in edit.regions.rows}
    for layer, rows in edit.regions.rows.items():
        got = decoded[edit.module_names[layer]]
        assert torch.equal(got.rows, rows), layer
        assert torch.equal(got.scales, torch.full((len(rows),), 0.9)), layer  # raw mode: the step is alpha
        assert torch.equal(got.direction, v), layer
    assert sum(len(u.rows) for u in decoded.values()) == 17


def test_resolve_device_passes_cpu_and_none():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
@pytest.mark.parametrize("device", [0, "cuda:1"])
def test_resolve_device_without_cuda_says_so(device):
    with pytest.raises(SurgeryError, match="CUDA"):
        resolve_device(device)


@pytest.mark.parametrize("device, message", [("gpu7", "unknown device 'gpu7'"), (True, "device must be")])
def test_resolve_device_refuses_other_values(device, message):
    with pytest.raises(SurgeryError, match=message):
        resolve_device(device)
