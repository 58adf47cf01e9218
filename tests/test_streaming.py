"""The edit straight from safetensors shards: the same adapter bits as the in-memory path, no model
built, and one-line errors for broken checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, assert_one_line_error, make_tiny, run_cli, write_probe

from surgery_plugin import SurgeryHyperParams, execute_surgery, export_adapter
from surgery_plugin.core import architectures, regions
from surgery_plugin.core.probe import Probe
from surgery_plugin.core.streaming import INDEX_FILE, CheckpointGates

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "surgery.json")
HPARAMS = [
    SurgeryHyperParams(top_k=30, alpha=0.7, normalize=True),
    SurgeryHyperParams(top_k=0.05, alpha=-1.5, normalize=False, max_rows_per_layer=12, layer_range=[1, 3]),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Score 7 rows at a time: several blocks per layer and a short last block, as on a real model."""
    monkeypatch.setattr(regions, "SCORE_BLOCK_ROWS", 7)


def _probe(hidden: int, seed: int = 1) -> Probe:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return Probe(weight=torch.stack([-v, v]), bias=torch.zeros(2), metadata={"model": "tiny"})


def _sharded(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / INDEX_FILE).is_file() and len(list(folder.glob("*.safetensors"))) >= 3
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ADAPTER_FILES}


@pytest.mark.parametrize("hp", HPARAMS, ids=["normalized", "raw-capped-range"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_adapter_is_bitwise_the_in_memory_adapter(family, hp, tmp_path, small_blocks):
    model = make_tiny(family)
    gates = CheckpointGates(_sharded(model, tmp_path / "ckpt"), dtype="float32")
    assert (gates.num_layers, gates.rows_per_layer, gates.hidden_size) == (3, architectures.num_gate_rows(model), 32)
    probe = _probe(gates.hidden_size)
    in_memory, streamed = execute_surgery(model, probe, hp), execute_surgery(gates, probe, hp)
    assert streamed.step == in_memory.step and streamed.regions.num_rows == in_memory.regions.num_rows
    a = export_adapter(in_memory, model, tmp_path / "memory", base_model_name="tiny")
    b = export_adapter(streamed, gates, tmp_path / "streamed", base_model_name="tiny")
    assert _files(a) == _files(b)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_checkpoint_read_in_the_dtype_the_model_would_be_loaded_in(family, tmp_path, small_blocks):
    from transformers import AutoModelForCausalLM

    folder = _sharded(make_tiny(family, dtype=torch.bfloat16), tmp_path / "ckpt")
    probe, hp = _probe(32), HPARAMS[0]
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        gates = CheckpointGates(folder, dtype=dtype)
        a = export_adapter(execute_surgery(model, probe, hp), model, tmp_path / f"m{dtype}", base_model_name="t")
        b = export_adapter(execute_surgery(gates, probe, hp), gates, tmp_path / f"s{dtype}", base_model_name="t")
        assert _files(a) == _files(b)


def test_hub_gpt2_names_without_the_transformer_prefix(tmp_path):
    from safetensors.torch import save_file

    model = make_tiny("gpt2")
    folder = tmp_path / "gpt2"
    model.config.save_pretrained(folder)
    state = {
        k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k
    }
    save_file(state, str(folder / "model.safetensors"))
    gates = CheckpointGates(folder)
    assert gates.tensor_name(2) == "h.2.mlp.c_fc.weight" and gates.module_name(2) == "transformer.h.2.mlp.c_fc"
    hp = HPARAMS[0]
    assert torch.equal(
        execute_surgery(gates, _probe(32), hp).regions.rows[2], execute_surgery(model, _probe(32), hp).regions.rows[2]
    )


def test_streaming_never_builds_a_model(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    folder = _sharded(make_tiny("llama"), tmp_path / "ckpt")

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(PreTrainedModel, "__init__", refuse)
    gates = CheckpointGates(folder)
    out = export_adapter(execute_surgery(gates, _probe(32), HPARAMS[0]), gates, tmp_path / "a", base_model_name="t")
    assert json.loads((out / "surgery.json").read_text())["num_rows"] == 30


def _tiny_hparams(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text("alg_name: Surgery\ntop_k: 10\nalpha: 1.0\nnormalize: true\n")
    return path


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temp folder was left behind"


@pytest.fixture(scope="module")
def smollm2_edits(tmp_path_factory):
    """``surgery edit`` of SmolLM2 with the shipped rows and step and the paper's direction, loaded and
    streamed (the streamed run may not load the model). A benign-mean projection needs the model's hidden
    states, which a streaming edit never computes: the shipped YAML's projection is set to null here."""
    tmp = tmp_path_factory.mktemp("smollm2-streaming")
    probe = write_probe(tmp / "p.safetensors", torch.randn(2, 576, generator=torch.Generator().manual_seed(0)))
    shipped = (Path(__file__).resolve().parents[1] / "hparams" / "Surgery" / "smollm2-135m.yaml").read_text()
    hparams = tmp / "paper-direction.yaml"
    hparams.write_text(shipped.replace("probe_project_out: benign_mean", "probe_project_out: null"))
    assert "probe_project_out: null" in hparams.read_text()
    memory = run_cli("edit", "--hparams", hparams, "--probe", probe, "--out", tmp / "memory")
    assert memory.returncode == 0, memory.stderr[-2000:]

    def refuse(*_args, **_kwargs):
        raise AssertionError("the streaming edit loaded the model")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("surgery_plugin.models.load_model", refuse)
        streamed = run_cli("edit", "--hparams", hparams, "--probe", probe, "--out", tmp / "streamed", "--streaming")
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    return probe, _files(tmp / "memory"), _files(tmp / "streamed")


@pytest.mark.real_model
@pytest.mark.parametrize("name", ADAPTER_FILES[:2])
def test_smollm2_streamed_adapter_is_bitwise_the_in_memory_adapter(smollm2_edits, name):
    _, memory, streamed = smollm2_edits
    assert memory[name] == streamed[name]


@pytest.mark.real_model
def test_smollm2_streamed_record_differs_only_in_the_streaming_flag(smollm2_edits):
    _, memory, streamed = smollm2_edits
    memory_record, streamed_record = json.loads(memory["surgery.json"]), json.loads(streamed["surgery.json"])
    assert (memory_record.pop("streaming"), streamed_record.pop("streaming")) == (False, True)
    memory_record.pop("record_sha256"), streamed_record.pop("record_sha256")  # the seal covers the flag
    assert memory_record == streamed_record  # the same files (their digests included), the same edit
    assert len(memory_record["rows_per_layer"]) == 20  # the shipped edit: layers 10-29, 3 row blocks per layer


@pytest.mark.real_model
def test_smollm2_shipped_benign_mean_edit_cannot_stream(smollm2_edits, tmp_path):
    probe = smollm2_edits[0]
    refused = run_cli("edit", "--probe", probe, "--out", tmp_path / "shipped", "--streaming")
    assert_one_line_error(refused, "cannot stream")
    _no_output(tmp_path / "shipped")


def test_streams_by_itself_when_the_model_would_not_fit(tmp_path, monkeypatch):
    folder = _sharded(make_tiny("llama"), tmp_path / "ckpt")
    probe = write_probe(tmp_path / "p.safetensors", torch.randn(2, 32))

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("surgery_plugin.models.load_model", refuse)
    monkeypatch.setattr("surgery_plugin.core.streaming.available_memory", lambda: 100_000)  # the model takes ~130 KB
    hparams = _tiny_hparams(tmp_path)
    result = run_cli("edit", "--model", folder, "--probe", probe, "--hparams", hparams, "--out", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "a" / "surgery.json").read_text())["streaming"] is True


def _broken(kind: str, folder: Path) -> Path:
    if kind == "no shards":
        folder.mkdir()
        make_tiny("llama").config.save_pretrained(folder)
        (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
        return folder
    if kind == "bert":
        from transformers import BertConfig, BertModel

        BertModel(
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
        ).save_pretrained(folder)
        return folder
    _sharded(make_tiny("llama"), folder)
    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    shard = folder / index["model.layers.1.mlp.gate_proj.weight"]
    if kind == "missing shard":
        shard.unlink()
    elif kind == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 1000)  # inside the gate tensor's 48 x 32 x 4 bytes
    return folder


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("no shards", ["no safetensors weights in", "pytorch_model.bin"]),
        ("missing shard", [INDEX_FILE, "names shard(s) missing"]),
        ("truncated", ["is truncated or corrupt"]),
        ("bert", ["model type 'bert' is not supported", "llama"]),
    ],
)
def test_broken_checkpoints_are_one_line_errors(kind, fragments, tmp_path):
    folder = _broken(kind, tmp_path / "ckpt")
    probe, out = write_probe(tmp_path / "p.safetensors", torch.randn(2, 32)), tmp_path / "adapter"
    hparams = _tiny_hparams(tmp_path)
    assert_one_line_error(
        run_cli("edit", "--model", folder, "--hparams", hparams, "--probe", probe, "--out", out, "--streaming"),
        *fragments,
    )
    _no_output(out)


def test_not_enough_disk_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    folder = _sharded(make_tiny("llama"), tmp_path / "ckpt")
    probe, out = write_probe(tmp_path / "p.safetensors", torch.randn(2, 32)), tmp_path / "adapter"
    full = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("surgery_plugin.io.files.shutil.disk_usage", lambda _p: full._replace(free=20_000))
    hparams = _tiny_hparams(tmp_path)
    result = run_cli("edit", "--model", folder, "--probe", probe, "--hparams", hparams, "--out", out, "--streaming")
    assert_one_line_error(result, "not enough disk space for", "0.0 MB free")
    _no_output(out)


def test_gates_of_a_loaded_model_and_of_its_checkpoint_agree(tmp_path):
    model = make_tiny("phi3")
    gates = CheckpointGates(_sharded(model, tmp_path / "ckpt"))
    in_memory = architectures.ModelGates(model)
    assert gates.lora_out_features == in_memory.lora_out_features == 96  # fused gate_up: the gate is half
    rows, cols = torch.tensor([0, 47, 13]), torch.tensor([31, 0, 7])
    assert torch.equal(gates.entries(2, rows, cols), in_memory.entries(2, rows, cols))
    assert torch.equal(torch.cat(list(gates.row_blocks(1, 5))), architectures.gate_rows(model, 1))
