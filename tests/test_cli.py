"""The ``surgery`` command as a user runs it: real subprocesses, real files, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROBE_META = dict(model="m", layer=1, pooling="mean", n_train=4, test_accuracy=1.0, test_auc=1.0, data="d", seed=0)


def surgery(*args, cwd=REPO, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "surgery_plugin.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=900)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("surgery: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_probe(path, weight, **meta):
    from safetensors.torch import save_file

    metadata = {k: json.dumps(v) for k, v in dict(PROBE_META, hidden_size=weight.shape[1], **meta).items()}
    save_file({"weight": weight, "bias": torch.zeros(2)}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer, saved as an ordinary HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.real_model
def test_model_path_prints_the_cached_folder():
    result = surgery("model-path", "smollm2-135m")
    folder = Path(result.stdout.strip())
    assert result.returncode == 0 and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "surgery_source.json").read_text())["gguf"].endswith(".gguf")


@pytest.mark.real_model
def test_unknown_model_type(tmp_path, smollm2):
    from transformers import BertConfig, BertLMHeadModel

    _, tok = smollm2
    folder = tmp_path / "bert"
    BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                               vocab_size=len(tok), is_decoder=True)).save_pretrained(folder)
    tok.save_pretrained(folder)
    probe = write_probe(tmp_path / "p.safetensors", torch.randn(2, 32))
    result = surgery("edit", "--model", folder, "--probe", probe, "--out", tmp_path / "out")
    assert_one_line_error(result, "model type 'bert' is not supported", "llama")
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_probe_errors(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    mismatch = write_probe(tmp_path / "wide.safetensors", torch.randn(2, 576), model="smollm2-135m")
    assert_one_line_error(surgery("edit", "--model", tiny_model_dir, "--probe", mismatch, "--out", out),
                          "probe hidden size 576 does not match the model's 32", "smollm2-135m")
    nan = write_probe(tmp_path / "nan.safetensors", torch.full((2, 32), float("nan")))
    assert_one_line_error(surgery("edit", "--model", tiny_model_dir, "--probe", nan, "--out", out), "NaN")
    zero = write_probe(tmp_path / "zero.safetensors", torch.zeros(2, 32))
    assert_one_line_error(surgery("edit", "--model", tiny_model_dir, "--probe", zero, "--out", out), "all zeros")
    assert not out.exists()


@pytest.mark.real_model
def test_data_and_hparams_errors(tiny_model_dir, tmp_path):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"bad text {i},1\n" for i in range(20)))
    out = tmp_path / "p.safetensors"
    assert_one_line_error(surgery("probe", "--model", tiny_model_dir, "--data", one_class, "--out", out), "single class")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert_one_line_error(surgery("probe", "--model", tiny_model_dir, "--data", empty, "--out", out), "empty")
    assert_one_line_error(surgery("probe", "--model", tiny_model_dir, "--data-dir", tmp_path / "nowhere", "--out", out),
                          "data folder not found")
    assert not out.exists()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("alg_name: Surgery\ntopk: 10\n")
    probe = write_probe(tmp_path / "ok.safetensors", torch.randn(2, 32))
    assert_one_line_error(surgery("edit", "--model", tiny_model_dir, "--probe", probe, "--hparams", bad_yaml, "--out", tmp_path / "a"),
                          "unknown key 'topk'")
    assert_one_line_error(surgery("eval", "--model", tiny_model_dir, "--suite", "rtp,nope", "--out", tmp_path / "run"), "unknown suite 'nope'")
    assert_one_line_error(surgery("eval", "--model", tiny_model_dir, "--judge", "oracle", "--out", tmp_path / "run"), "unknown judge 'oracle'")
    assert_one_line_error(surgery("edit", "--model", tmp_path / "no-model", "--probe", probe, "--out", tmp_path / "a"), "model folder not found")
    assert not (tmp_path / "a").exists() and not (tmp_path / "run").exists()
