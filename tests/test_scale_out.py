"""The commands the README gives for models that outgrow one machine: built by one function, accepted
by lm-eval's and surgery's own parsers, and refusing adapters vLLM cannot load."""

import ast
import inspect
from pathlib import Path

import pytest
import torch
from helpers import make_tiny

from surgery_plugin import SurgeryError, SurgeryHyperParams, execute_surgery, export_adapter
from surgery_plugin.commands import cli
from surgery_plugin.core import architectures
from surgery_plugin.core.probe import Probe
from surgery_plugin.evaluation.scale_out import lm_eval_command, shell, surgery_command, vllm_refusal


def _adapter(family: str, folder: Path) -> Path:
    model = make_tiny(family)
    v = torch.randn(architectures.hidden_size(model), generator=torch.Generator().manual_seed(0))
    edit = execute_surgery(model, Probe(torch.stack([-v, v]), torch.zeros(2)), SurgeryHyperParams(top_k=5))
    return export_adapter(edit, model, folder, base_model_name=f"tiny-{family}")


def _lm_eval_parse(command: list[str]):
    """lm-eval's own command-line parser on ``command`` (as ``lm_eval`` would see it)."""
    lm_eval_cli = pytest.importorskip("lm_eval._cli", reason="lm-eval is not installed")
    assert command[0] == "lm_eval"
    return lm_eval_cli.HarnessCLI()._parser.parse_args(["run", *command[1:]])


def _model_args(parsed) -> dict:
    from lm_eval.utils import simple_parse_args_string

    raw = parsed.model_args
    return raw if isinstance(raw, dict) else simple_parse_args_string(raw)


def test_hf_command_with_peft_and_device_map_auto(tmp_path):
    adapter = _adapter("llama", tmp_path / "a")
    command = lm_eval_command(
        "/models/llama-70b", "surgery_rtp", adapter=adapter, device_map_auto=True, include_path="/tasks", limit=20
    )
    parsed = _lm_eval_parse(command)
    assert parsed.model == "hf" and parsed.limit == 20
    assert _model_args(parsed) == {"pretrained": "/models/llama-70b", "peft": str(adapter), "parallelize": True}
    from lm_eval.models.huggingface import HFLM

    assert {"pretrained", "peft", "parallelize"} <= set(inspect.signature(HFLM.__init__).parameters)


def test_vllm_command_loads_the_adapter_as_a_lora(tmp_path):
    adapter = _adapter("llama", tmp_path / "a")
    assert vllm_refusal(adapter) is None
    command = lm_eval_command("/models/llama-70b", "mmlu", adapter=adapter, engine="vllm", gpus=4)
    args = _model_args(_lm_eval_parse(command))
    assert args == {
        "pretrained": "/models/llama-70b",
        "enable_lora": True,
        "max_lora_rank": 8,
        "lora_local_path": str(adapter),
        "tensor_parallel_size": 4,
        "dtype": "auto",
    }
    # lm-eval's vLLM wrapper imports vllm at module level, so its signature is read from the source
    source = Path(pytest.importorskip("lm_eval").__file__).parent / "models" / "vllm_causallms.py"
    init = next(
        node
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    named = {a.arg for a in init.args.args} | {a.arg for a in init.args.kwonlyargs}
    assert {"pretrained", "lora_local_path", "max_lora_rank", "tensor_parallel_size", "dtype"} <= named
    assert init.args.kwarg is not None  # enable_lora travels through **kwargs to vllm.LLM


@pytest.mark.parametrize("family, reason", [("gpt2", "Conv1D"), ("phi3", "fused gate_up_proj")])
def test_vllm_refuses_adapters_it_cannot_load_and_says_merge(family, reason, tmp_path):
    adapter = _adapter(family, tmp_path / "a")
    assert reason in vllm_refusal(adapter)
    with pytest.raises(SurgeryError, match=f"{reason}.*surgery merge"):
        lm_eval_command("/m", "mmlu", adapter=adapter, engine="vllm")
    merged = lm_eval_command("/merged", "mmlu", engine="vllm", gpus=2)  # the merged folder needs no LoRA
    assert _model_args(_lm_eval_parse(merged)) == {"pretrained": "/merged", "tensor_parallel_size": 2, "dtype": "auto"}


def test_bad_combinations_are_errors(tmp_path):
    with pytest.raises(SurgeryError, match="accelerate"):
        lm_eval_command("/m", "mmlu", engine="vllm", device_map_auto=True)
    with pytest.raises(SurgeryError, match=">= 1"):
        lm_eval_command("/m", "mmlu", engine="vllm", max_lora_rank=0)
    with pytest.raises(SurgeryError, match="comma"):
        lm_eval_command("/models/a,b", "mmlu")


def test_surgery_commands_parse_with_device_map_auto():
    for command in (
        surgery_command("eval", "/models/llama-70b", adapter="adapter/", suite="rtp,ppl", out="runs/big"),
        surgery_command("probe", "/models/llama-70b", data="davidson", out="probe.safetensors"),
        surgery_command("merge", "/models/llama-70b", adapter="adapter/", out="merged/"),
    ):
        assert command[0] == "surgery"
        args = cli.build_parser().parse_args(command[1:])
        assert args.device_map == "auto" and args.model == "/models/llama-70b"
    assert shell(["surgery", "eval", "--out", "runs/a b"]) == "surgery eval --out 'runs/a b'"


def test_device_map_auto_and_device_exclude_each_other(tmp_path, capsys):
    argv = ["merge", "--device", "cpu", "--device-map", "auto", "--adapter", "a", "--out", str(tmp_path / "run")]
    code = cli.main(argv)
    assert code == 2 and "--device and --device-map exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
