"""The ``surgery`` command, run in this process (``run_cli``) on tiny model folders: one-line errors, the
report splits ``surgery eval`` uses by default, a custom ``--start`` range, and probe -> edit -> eval ->
alpha sweep -> merge end to end."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_one_line_error, run_cli, tiny_hf_tokenizer, write_probe

SHIPPED = Path(__file__).resolve().parents[1] / "hparams" / "Surgery" / "smollm2-135m.yaml"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- model-path


@pytest.mark.real_model
def test_model_path_prints_the_cached_folder():
    result = run_cli("model-path", "smollm2-135m")
    assert result.returncode == 0, result.stderr[-2000:]
    folder = Path(result.stdout.strip())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "surgery_source.json").read_text())["gguf"].endswith(".gguf")


# ---------------------------------------------------------------- bad models and probes: one line, nothing written


def test_unknown_model_type_is_one_line(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    tok = tiny_hf_tokenizer()
    folder = tmp_path / "bert"
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=len(tok)
    )
    config.is_decoder = True
    BertLMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    probe = write_probe(tmp_path / "p.safetensors", torch.randn(2, 32))
    result = run_cli("edit", "--model", folder, "--hparams", SHIPPED, "--probe", probe, "--out", tmp_path / "out")
    assert_one_line_error(result, "model type 'bert' is not supported", "llama")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "weight, meta, fragments",
    [
        (torch.randn(2, 576), {"model": "smollm2-135m"}, ["probe hidden size 576 does not match the model's 32"]),
        (torch.full((2, 32), float("nan")), {}, ["NaN"]),
        (torch.zeros(2, 32), {}, ["all zeros"]),
    ],
    ids=["hidden-size-mismatch", "nan", "all-zeros"],
)
def test_unusable_probe_is_one_line(tiny_model_dir, tmp_path, weight, meta, fragments):
    probe = write_probe(tmp_path / "probe.safetensors", weight, **meta)
    out = tmp_path / "adapter"
    result = run_cli("edit", "--model", tiny_model_dir, "--hparams", SHIPPED, "--probe", probe, "--out", out)
    assert_one_line_error(result, *fragments, *meta.values())
    assert not out.exists()


def test_probe_data_of_one_class_is_one_line(tiny_model_dir, tmp_path):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"bad text {i},1\n" for i in range(20)))
    out = tmp_path / "p.safetensors"
    assert_one_line_error(
        run_cli("probe", "--model", tiny_model_dir, "--data", one_class, "--out", out), "single class"
    )
    assert not out.exists()


def _probe_empty_csv(model_dir, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    out = tmp_path / "p.safetensors"
    return run_cli("probe", "--model", model_dir, "--data", empty, "--out", out), out


def test_empty_probe_data_is_one_line(tiny_model_dir, tmp_path):
    result, out = _probe_empty_csv(tiny_model_dir, tmp_path)
    assert_one_line_error(result)
    assert not out.exists()


def test_empty_probe_data_says_the_data_is_empty(tiny_model_dir, tmp_path):
    result, _ = _probe_empty_csv(tiny_model_dir, tmp_path)
    assert_one_line_error(result, "empty.csv has no rows")


def test_missing_data_folder_is_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "p.safetensors"
    result = run_cli("probe", "--model", tiny_model_dir, "--data-dir", tmp_path / "nowhere", "--out", out)
    assert_one_line_error(result, "data folder not found")
    assert not out.exists()


def test_unknown_hparams_key_is_one_line(tiny_model_dir, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("alg_name: Surgery\ntopk: 10\n")
    probe = write_probe(tmp_path / "ok.safetensors", torch.randn(2, 32))
    result = run_cli(
        "edit", "--model", tiny_model_dir, "--probe", probe, "--hparams", bad_yaml, "--out", tmp_path / "a"
    )
    assert_one_line_error(result, "unknown key 'topk'")
    assert not (tmp_path / "a").exists()


def test_missing_model_folder_is_one_line(tmp_path):
    probe = write_probe(tmp_path / "ok.safetensors", torch.randn(2, 32))
    result = run_cli(
        "edit", "--model", tmp_path / "no-model", "--hparams", SHIPPED, "--probe", probe, "--out", tmp_path / "a"
    )
    assert_one_line_error(result, "model folder not found")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("command", ["edit", "probe", "tune"])
def test_hparams_of_another_behavior_is_one_line(command, tiny_model_dir, tmp_path):
    """The shipped toxicity YAML given with ``--behavior jailbreak``: refused before anything loads."""
    probe = write_probe(tmp_path / "ok.safetensors", torch.randn(2, 32))
    extra = ["--probe", probe] if command == "edit" else []
    out = tmp_path / "out"
    result = run_cli(
        command, "--model", tiny_model_dir, "--behavior", "jailbreak", "--hparams", SHIPPED, *extra, "--out", out
    )
    assert_one_line_error(result, "for behavior 'toxicity', not 'jailbreak'", str(SHIPPED))
    assert not out.exists()


def test_verbose_shows_the_chain_of_causes(tiny_model_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    args = ("edit", "--model", tiny_model_dir, "--hparams", SHIPPED, "--probe", junk, "--out", tmp_path / "a")
    assert_one_line_error(run_cli(*args), "not a readable safetensors probe")
    loud = run_cli("-v", *args)
    assert loud.returncode == 2
    assert "surgery: error:" in loud.stderr and "direct cause" in loud.stderr and "SafetensorError" in loud.stderr


# ---------------------------------------------------------------- `surgery eval` bad input


def test_unknown_suite_is_one_line(tiny_model_dir, tmp_path):
    result = run_cli("eval", "--model", tiny_model_dir, "--suite", "rtp,nope", "--out", tmp_path / "run")
    assert_one_line_error(result, "unknown suite 'nope'")
    assert not (tmp_path / "run").exists()


def test_samples_for_suites_without_a_sampled_protocol_is_one_line(tiny_model_dir, tmp_path):
    result = run_cli("eval", "--model", tiny_model_dir, "--suite", "ppl", "--samples", "3", "--out", tmp_path / "run")
    assert_one_line_error(result, "--samples: none of the suites ppl has a sampled protocol", "attitude")
    assert not (tmp_path / "run").exists()


def test_sample_limit_without_samples_is_one_line(tiny_model_dir, tmp_path):
    result = run_cli(
        "eval", "--model", tiny_model_dir, "--suite", "rtp", "--sample-limit", "5", "--out", tmp_path / "run"
    )
    assert_one_line_error(result, "--sample-limit limits the sampled protocol: pass --samples too")
    assert not (tmp_path / "run").exists()


def test_unknown_judge_is_one_line(tiny_model_dir, tmp_path):
    result = run_cli("eval", "--model", tiny_model_dir, "--judge", "profanity,oracle", "--out", tmp_path / "run")
    assert_one_line_error(result, "unknown judge 'oracle'", "available:")
    assert not (tmp_path / "run").exists()


def test_perspective_without_a_key_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "")
    result = run_cli("eval", "--model", tiny_model_dir, "--judge", "perspective", "--out", tmp_path / "run")
    assert_one_line_error(result, "PERSPECTIVE_API_KEY")
    assert not (tmp_path / "run").exists()


def test_hf_judge_that_cannot_load_is_one_line(tiny_model_dir, tmp_path):
    result = run_cli(
        "eval", "--model", tiny_model_dir, "--judge", f"hf:{tmp_path / 'no-model'}", "--out", tmp_path / "r"
    )
    assert_one_line_error(result, "could not load", "hf:/path/to/folder")
    assert not (tmp_path / "r").exists()


def test_missing_data_file_is_one_line(tiny_model_dir, tmp_path):
    empty = tmp_path / "data"
    (empty / "rtp").mkdir(parents=True)
    run = tmp_path / "run"
    result = run_cli(
        "eval", "--model", tiny_model_dir, "--suite", "advbench", "--limit", 1, "--data-dir", empty, "--out", run
    )
    assert_one_line_error(result, "missing data file", "harmful_behaviors.csv")
    assert not (run / "results.json").exists()


def test_start_past_the_end_is_one_line(tiny_model_dir, tmp_path, data_dir):
    run = tmp_path / "run"
    result = run_cli(
        "eval", "--model", tiny_model_dir, "--suite", "rtp", "--start", 5000, "--data-dir", data_dir, "--out", run
    )
    assert_one_line_error(result, "no RTP prompts in range start=5000", "1000 available")
    assert not run.exists()


@pytest.mark.parametrize("option", [["--toxigen-groups", "probe"], ["--benign-start", 300]])
def test_custom_range_options_without_start_are_one_line(option, tiny_model_dir, tmp_path):
    """Without --start every suite runs on its report split: a range option alone is refused, not ignored."""
    result = run_cli("eval", "--model", tiny_model_dir, *option, "--out", tmp_path / "run")
    assert_one_line_error(result, "pass --start too")
    assert not (tmp_path / "run").exists()


def test_alpha_sweep_without_an_adapter_is_one_line(tiny_model_dir, tmp_path):
    result = run_cli("eval", "--model", tiny_model_dir, "--alpha-sweep", "0,1", "--out", tmp_path / "run")
    assert_one_line_error(result, "--alpha-sweep needs --adapter")
    assert not (tmp_path / "run").exists()


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
        (["eval", "--alpha-sweep", "0,nan"], "alpha 'nan' is not valid (expected a finite number"),
        (["edit", "--probe", "p", "--alpha", "inf"], "argument --alpha: expected a finite number"),
        (["edit", "--probe", "p", "--top-k", "0"], "argument --top-k: must be > 0"),
        (["probe", "--max-per-class", "0"], "argument --max-per-class: must be >= 1"),
        (["demo", "--limit", "-1"], "argument --limit: must be >= 1"),
    ],
)
def test_numeric_options_out_of_range_are_one_line_errors(args, fragment, tmp_path):
    result = run_cli(*args, "--out", tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- `surgery eval` without --start: the report splits

REPORT_SUITES = "rtp,toxigen,advbench,safeedit,false_refusal,ppl"


@pytest.fixture(scope="module")
def report_run(tiny_model_dir, data_dir, tmp_path_factory):
    """Every suite of REPORT_SUITES on its whole report split (one new token: the ranges are the point; batches of
    4 because SafeEdit's jailbreak prompts are ~2000 tokens of the tiny tokenizer)."""
    run = tmp_path_factory.mktemp("report") / "run"
    result = run_cli(
        "eval", "--model", tiny_model_dir, "--suite", REPORT_SUITES, "--max-new-tokens", 1, "--batch-size", 4,
        "--data-dir", data_dir, "--out", run,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    samples = _jsonl(run / "samples.jsonl")
    return results, samples


def _rows(samples, suite):
    return [s for s in samples if s["suite"] == suite]


def test_eval_records_each_suites_report_split(report_run):
    results, _ = report_run
    assert list(results["settings"]) == REPORT_SUITES.split(",")
    assert {suite: s["split"] for suite, s in results["settings"].items()} == dict.fromkeys(
        results["settings"], "report"
    )


def test_eval_batches_by_the_protocols_default_unless_told(report_run):
    from surgery_plugin.commands.cli import build_parser
    from surgery_plugin.commands.compare import CompareConfig
    from surgery_plugin.evaluation.protocols import EVAL_BATCH_SIZE, EvalSettings

    results, _ = report_run  # run with --batch-size 4
    assert {s["batch_size"] for s in results["settings"].values()} == {4}
    assert EvalSettings().batch_size == CompareConfig(model="m", out="o").batch_size == EVAL_BATCH_SIZE
    subcommands = next(a for a in build_parser()._actions if a.choices and "eval" in a.choices).choices
    for command in ("eval", "compare"):  # not given: the settings' default, which the help names
        assert subcommands[command].get_default("batch_size") is None
        assert f"EVAL_BATCH_SIZE, {EVAL_BATCH_SIZE})" in subcommands[command].format_help()


def test_eval_rtp_defaults_to_prompts_500_to_800(report_run, data_dir):
    results, samples = report_run
    assert results["settings"]["rtp"]["start"] == 500 and results["settings"]["rtp"]["limit"] == 300
    assert results["suites"]["rtp"]["prompts"] == "rtp/toxic.jsonl[500:800]"
    file_prompts = [r["prompt"]["text"] for r in _jsonl(data_dir / "rtp" / "toxic.jsonl")]
    assert [r["prompt"] for r in _rows(samples, "rtp")] == file_prompts[500:800]


def test_eval_toxigen_defaults_to_lines_0_to_50_of_the_held_out_groups(report_run, data_dir):
    results, samples = report_run
    held_out = ["asian", "jewish", "lgbtq", "mental_disability", "muslim", "women"]
    settings = results["settings"]["toxigen"]
    assert settings["start"] == 0 and settings["limit"] == 6 * 50 and settings["toxigen_groups"] == held_out
    assert results["suites"]["toxigen"]["groups"] == held_out
    assert results["suites"]["toxigen"]["prompts"].endswith("from line 0")
    rows = _rows(samples, "toxigen")
    for group in held_out:
        path = data_dir / "toxigen" / "prompts" / f"hate_{group}_1k.txt"
        lines = [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert [r["prompt"] for r in rows if r["group"] == group] == lines[0:50], group
    assert len(rows) == 300


def test_eval_advbench_defaults_to_instructions_0_to_100(report_run, data_dir):
    results, samples = report_run
    assert results["settings"]["advbench"]["start"] == 0
    assert results["suites"]["advbench"]["prompts"] == "advbench/harmful_behaviors.csv[0:100]"
    with open(data_dir / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as f:
        goals = [row["goal"] for row in csv.DictReader(f)]
    assert [r["prompt"] for r in _rows(samples, "advbench")] == goals[0:100]


def test_eval_safeedit_defaults_to_records_60_to_93(report_run, data_dir):
    results, samples = report_run
    assert results["settings"]["safeedit"]["start"] == 60
    assert results["suites"]["safeedit"]["records"] == "safeedit[60:93]"
    [path] = sorted((data_dir / "safeedit").glob("*.json"))
    records = json.loads(path.read_text(encoding="utf-8"))
    rows = _rows(samples, "safeedit")
    assert [r["record_id"] for r in rows if r["metric"] == "DS"] == [r.get("id") for r in records[60:93]]
    assert [r["prompt"] for r in rows if r["metric"] == "DS"] == [r["adversarial prompt"] for r in records[60:93]]


def test_eval_false_refusal_defaults_to_every_benign_question(report_run, data_dir):
    results, samples = report_run
    [path] = sorted((data_dir / "safeedit").glob("*.json"))
    questions = [r["knowledge constrain"]["prompt"] for r in json.loads(path.read_text(encoding="utf-8"))]
    assert results["settings"]["false_refusal"]["start"] == 0
    assert results["suites"]["false_refusal"]["prompts"].endswith(f"[0:{len(questions)}]")
    assert [r["prompt"] for r in _rows(samples, "false_refusal")] == questions


def test_eval_ppl_defaults_to_benign_documents_0_to_200(report_run):
    results, _ = report_run
    settings = results["settings"]["ppl"]
    assert settings["benign_start"] == 0 and settings["ppl_limit"] == 200
    assert results["suites"]["ppl"]["n_texts"] == 200
    assert results["suites"]["ppl"]["text"].endswith("non-challenging [0:200]")


# ---------------------------------------------------------------- `surgery eval --start N`: a range of one's own


@pytest.fixture(scope="module")
def custom_run(tiny_model_dir, data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("custom") / "run"
    result = run_cli(
        "eval", "--model", tiny_model_dir, "--suite", "rtp,toxigen,ppl", "--start", 7, "--limit", 3,
        "--benign-start", 5, "--ppl-limit", 4, "--toxigen-groups", "women,muslim", "--max-new-tokens", 1,
        "--data-dir", data_dir, "--out", run,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run / "results.json").read_text()), _jsonl(run / "samples.jsonl")


def test_eval_start_evaluates_a_custom_range(custom_run, data_dir):
    results, samples = custom_run
    assert results["settings"]["rtp"]["split"] is None and results["settings"]["rtp"]["start"] == 7
    assert results["suites"]["rtp"]["prompts"] == "rtp/toxic.jsonl[7:10]"
    file_prompts = [r["prompt"]["text"] for r in _jsonl(data_dir / "rtp" / "toxic.jsonl")]
    assert [r["prompt"] for r in _rows(samples, "rtp")] == file_prompts[7:10]


def test_eval_start_takes_the_benign_range_and_toxigen_groups_given(custom_run):
    results, samples = custom_run
    assert results["suites"]["ppl"]["text"].endswith("non-challenging [5:9]")
    assert results["suites"]["ppl"]["n_texts"] == 4
    assert results["settings"]["toxigen"]["toxigen_groups"] == ["women", "muslim"]
    # round-robin over the two groups (sorted) from line 7: muslim, women, muslim
    assert [r["group"] for r in _rows(samples, "toxigen")] == ["muslim", "women", "muslim"]


# ---------------------------------------------------------------- probe -> edit -> eval -> sweep -> merge


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, data_dir, tmp_path_factory):
    """The commands a user runs, in order, on a tiny model: probe, edit, eval with the adapter, an alpha sweep,
    eval of the base model, merge."""
    root = tmp_path_factory.mktemp("pipeline")
    hparams = root / "tiny.yaml"
    hparams.write_text(
        yaml.safe_dump(
            {
                "alg_name": "Surgery",
                "model_name": "tiny-llama",
                "probe_layer": 2,
                "top_k": 0.1,
                "alpha": 1.5,
                "normalize": True,
                "behavior": "toxicity",
            }
        )
    )
    paths = {"root": root, "hparams": hparams, "probe": root / "probe.safetensors", "adapter": root / "adapter"}
    ran = {}
    ran["probe"] = run_cli(
        "probe", "--model", tiny_model_dir, "--data", "davidson", "--layer", 2, "--max-per-class", 60,
        "--data-dir", data_dir, "--out", paths["probe"],
    )  # fmt: skip
    ran["edit"] = run_cli(
        "edit", "--model", tiny_model_dir, "--probe", paths["probe"], "--hparams", hparams, "--out", paths["adapter"]
    )
    common = ("--suite", "rtp,ppl", "--limit", 6, "--ppl-limit", 6, "--max-new-tokens", 8, "--data-dir", data_dir)
    ran["eval"] = run_cli(
        "eval", "--model", tiny_model_dir, "--adapter", paths["adapter"], "--judge", "profanity", *common,
        "--out", root / "run",
    )  # fmt: skip
    ran["sweep"] = run_cli(
        "eval", "--model", tiny_model_dir, "--adapter", paths["adapter"], "--alpha-sweep", "0,1.5", *common,
        "--out", root / "sweep",
    )  # fmt: skip
    ran["base"] = run_cli("eval", "--model", tiny_model_dir, *common, "--out", root / "base")
    ran["merge"] = run_cli("merge", "--model", tiny_model_dir, "--adapter", paths["adapter"], "--out", root / "merged")
    return ran, paths


def _ok(pipeline, step):
    ran, paths = pipeline
    assert ran[step].returncode == 0, ran[step].stderr[-3000:]
    return paths["root"]


def test_cli_probe_reports_held_out_accuracy(pipeline):
    ran, paths = pipeline
    _ok(pipeline, "probe")
    assert "held-out accuracy" in ran["probe"].stdout
    from safetensors import safe_open

    with safe_open(str(paths["probe"]), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["layer"]) == 2 and meta["behavior"] == "toxicity" and json.loads(meta["n_test"]) > 0


def test_cli_edit_records_probe_hparams_and_versions(pipeline):
    _ok(pipeline, "edit")
    _, paths = pipeline
    record = json.loads((paths["adapter"] / "surgery.json").read_text())
    from safetensors.torch import load_file

    saved = load_file(str(paths["probe"]))
    digest = hashlib.sha256(saved["weight"].float().numpy().tobytes() + saved["bias"].float().numpy().tobytes())
    assert record["probe_sha256"] == digest.hexdigest()
    assert record["hparams"]["alpha"] == 1.5 and record["hparams"]["top_k"] == 0.1
    assert record["versions"]["torch"] == torch.__version__


def test_cli_eval_with_adapter_writes_results_and_samples(pipeline):
    root = _ok(pipeline, "eval")
    results = json.loads((root / "run" / "results.json").read_text())
    rtp, ppl = results["suites"]["rtp"], results["suites"]["ppl"]
    rows = _jsonl(root / "run" / "samples.jsonl")
    samples = [r for r in rows if r["suite"] == "rtp"]
    assert rtp["n"] == 6 and rtp["judge"] == "profanity" and len(samples) == 6
    assert sum(r["tokens"] for r in rows if r["suite"] == "ppl") == ppl["n_tokens"]  # a row per benign document
    assert {"suite", "prompt", "completion", "scores"} <= set(samples[0])
    toxic = [s["scores"]["profanity"] >= 0.5 for s in samples]
    assert rtp["toxic_rate"] == pytest.approx(sum(toxic) / len(toxic))
    assert ppl["token_perplexity"] > 1 and ppl["n_tokens"] > 0
    assert results["adapter"] == str(pipeline[1]["adapter"]) and results["alpha"] == 1.5


def test_cli_alpha_sweep_runs_each_alpha(pipeline):
    root = _ok(pipeline, "sweep")
    sweep = json.loads((root / "sweep" / "sweep.json").read_text())["runs"]
    assert [run["alpha"] for run in sweep] == [0.0, 1.5] and (root / "sweep" / "sweep.png").is_file()


def test_cli_alpha_sweep_at_0_is_the_base_model(pipeline):
    root = _ok(pipeline, "sweep")
    _ok(pipeline, "base")
    at_0 = json.loads((root / "sweep" / "alpha_0" / "results.json").read_text())["suites"]
    base = json.loads((root / "base" / "results.json").read_text())["suites"]
    assert at_0["ppl"]["token_perplexity"] == pytest.approx(base["ppl"]["token_perplexity"], rel=1e-6)
    assert (root / "sweep" / "alpha_0" / "samples.jsonl").read_text() == (root / "base" / "samples.jsonl").read_text()


def test_cli_alpha_sweep_at_the_made_alpha_is_the_adapter(pipeline):
    root = _ok(pipeline, "sweep")
    _ok(pipeline, "eval")
    as_made = json.loads((root / "sweep" / "alpha_1.5" / "results.json").read_text())["suites"]
    adapter_run = json.loads((root / "run" / "results.json").read_text())["suites"]
    base = json.loads((root / "base" / "results.json").read_text())["suites"]
    assert as_made["ppl"]["token_perplexity"] == pytest.approx(adapter_run["ppl"]["token_perplexity"], rel=1e-5)
    assert as_made["ppl"]["token_perplexity"] != pytest.approx(base["ppl"]["token_perplexity"], rel=1e-6)
    assert (root / "sweep" / "alpha_1.5" / "samples.jsonl").read_text() == (root / "run" / "samples.jsonl").read_text()


def test_cli_merge_writes_a_loadable_model_with_the_users_permissions(pipeline):
    root = _ok(pipeline, "merge")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(root / "merged").config.model_type == "llama"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "surgery_source.json"):  # safetensors alone would write 0600
        assert stat.S_IMODE(os.stat(root / "merged" / name).st_mode) == 0o666 & ~umask, name
