"""The ``surgery`` command as a user runs it: real subprocesses, real files, one-line errors."""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, surgery, write_probe

SHIPPED = Path(__file__).resolve().parents[1] / "hparams" / "Surgery" / "smollm2-135m.yaml"


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
    BertLMHeadModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            vocab_size=len(tok),
            is_decoder=True,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    probe = write_probe(tmp_path / "p.safetensors", torch.randn(2, 32))
    result = surgery("edit", "--model", folder, "--hparams", SHIPPED, "--probe", probe, "--out", tmp_path / "out")
    assert_one_line_error(result, "model type 'bert' is not supported", "llama")
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_probe_errors(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    mismatch = write_probe(tmp_path / "wide.safetensors", torch.randn(2, 576), model="smollm2-135m")
    assert_one_line_error(
        surgery("edit", "--model", tiny_model_dir, "--hparams", SHIPPED, "--probe", mismatch, "--out", out),
        "probe hidden size 576 does not match the model's 32",
        "smollm2-135m",
    )
    nan = write_probe(tmp_path / "nan.safetensors", torch.full((2, 32), float("nan")))
    assert_one_line_error(
        surgery("edit", "--model", tiny_model_dir, "--hparams", SHIPPED, "--probe", nan, "--out", out), "NaN"
    )
    zero = write_probe(tmp_path / "zero.safetensors", torch.zeros(2, 32))
    assert_one_line_error(
        surgery("edit", "--model", tiny_model_dir, "--hparams", SHIPPED, "--probe", zero, "--out", out), "all zeros"
    )
    assert not out.exists()


@pytest.mark.real_model
def test_data_and_hparams_errors(tiny_model_dir, tmp_path):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"bad text {i},1\n" for i in range(20)))
    out = tmp_path / "p.safetensors"
    assert_one_line_error(
        surgery("probe", "--model", tiny_model_dir, "--data", one_class, "--out", out), "single class"
    )
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert_one_line_error(surgery("probe", "--model", tiny_model_dir, "--data", empty, "--out", out), "empty")
    assert_one_line_error(
        surgery("probe", "--model", tiny_model_dir, "--data-dir", tmp_path / "nowhere", "--out", out),
        "data folder not found",
    )
    assert not out.exists()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("alg_name: Surgery\ntopk: 10\n")
    probe = write_probe(tmp_path / "ok.safetensors", torch.randn(2, 32))
    assert_one_line_error(
        surgery("edit", "--model", tiny_model_dir, "--probe", probe, "--hparams", bad_yaml, "--out", tmp_path / "a"),
        "unknown key 'topk'",
    )
    assert_one_line_error(
        surgery("eval", "--model", tiny_model_dir, "--suite", "rtp,nope", "--out", tmp_path / "run"),
        "unknown suite 'nope'",
    )
    assert_one_line_error(
        surgery("eval", "--model", tiny_model_dir, "--judge", "oracle", "--out", tmp_path / "run"),
        "unknown judge 'oracle'",
    )
    assert_one_line_error(
        surgery(
            "edit", "--model", tmp_path / "no-model", "--hparams", SHIPPED, "--probe", probe, "--out", tmp_path / "a"
        ),
        "model folder not found",
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["eval", "--limit", "-5"], "argument --limit: must be >= 1, got -5"),
        (["eval", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (["eval", "--start", "-1"], "argument --start: must be >= 0, got -1"),
        (["eval", "--ppl-limit", "0"], "argument --ppl-limit: must be >= 1"),
        (["eval", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["eval", "--samples", "1"], "argument --samples: must be >= 2"),
        (["eval", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be >= 1"),
        (["eval", "--seed", "x"], "argument --seed: expected a whole number, got 'x'"),
        (["eval", "--alpha-sweep", "0,nan"], "--alpha-sweep takes comma-separated finite numbers"),
        (["edit", "--probe", "p", "--alpha", "inf"], "argument --alpha: expected a finite number"),
        (["edit", "--probe", "p", "--top-k", "0"], "argument --top-k: must be > 0"),
        (["probe", "--max-per-class", "0"], "argument --max-per-class: must be >= 1"),
        (["demo", "--limit", "-1"], "argument --limit: must be >= 1"),
    ],
)
def test_numeric_options_out_of_range_are_one_line_errors(args, fragment, tmp_path):
    result = surgery(*args, "--out", tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_start_past_the_end_is_one_line(tmp_path, data_dir):
    result = surgery("eval", "--suite", "rtp", "--start", 5000, "--data-dir", data_dir, "--out", tmp_path / "run")
    assert_one_line_error(result, "no RTP prompts in range start=5000", "1000 available")
    assert not (tmp_path / "run").exists()


@pytest.mark.real_model
def test_verbose_shows_the_chain_of_causes(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    quiet = surgery("edit", "--probe", junk, "--out", tmp_path / "a")
    assert_one_line_error(quiet, "not a readable safetensors probe")
    loud = surgery("-v", "edit", "--probe", junk, "--out", tmp_path / "a")
    assert loud.returncode == 2
    assert "surgery: error:" in loud.stderr and "direct cause" in loud.stderr and "SafetensorError" in loud.stderr
