"""``surgery compare``: bad input, the whole driver on a tiny model (EasyEdit's real algorithms included), the
saved edits loaded back onto a fresh base model, and EasyEdit's baselines on the real SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO, assert_one_line_error, easyedit_python, make_tiny, surgery

from surgery_plugin.commands.compare.methods import METHODS, cost_ratios, parse_methods
from surgery_plugin.errors import SurgeryError
from surgery_plugin.evaluation.generation import first_token_kl, next_token_logprobs
from surgery_plugin.io.saved_edits import (
    EDITED_TENSORS,
    load_saved_edit,
    read_edit_record,
    save_low_rank_edit,
    save_prompt_edit,
    save_tensors_edit,
)

COST_KEYS = {"edit_seconds", "peak_rss_bytes", "changed_params", "edit_bytes"}
ROWS = {"unedited", "prompt", "surgery-records", "surgery-shipped", "dinm", "rome", "ft-l", "ft-m"}


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def _compare(python: str, cwd, *args) -> subprocess.CompletedProcess:
    """``surgery compare ARGS`` as a user runs it, one CPU thread, in ``cwd`` (EasyEdit writes ./logs)."""
    return subprocess.run(
        [python, "-m", "surgery_plugin.cli", "compare", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(PYTHONPATH=str(REPO)),
        timeout=1200,
    )


# ---------------------------------------------------------------------------- bad input


def test_unknown_method_is_one_line_listing_the_methods(tmp_path):
    out = tmp_path / "run"
    result = surgery("compare", "--methods", "surgery,memit", "--out", out)
    assert_one_line_error(result, "unknown method 'memit'", ", ".join(METHODS))
    assert not out.exists()
    with pytest.raises(SurgeryError, match="given twice"):
        parse_methods("dinm,dinm")


def test_without_easyedit_one_line_says_how_to_install_and_what_runs(tmp_path):
    out = tmp_path / "run"
    code = textwrap.dedent(f"""\
        import sys
        sys.modules["easyeditor"] = None  # what an environment without EasyEdit looks like to import
        from surgery_plugin.cli import main
        sys.exit(main(["compare", "--methods", "surgery,dinm,rome", "--out", {str(out)!r}]))
        """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300
    )
    assert_one_line_error(result, "dinm, rome run through EasyEdit", "make easyedit", "--methods surgery,prompt")
    assert not out.exists()


def test_bad_override_and_suite_are_one_line_errors_before_any_work(tmp_path):
    result = surgery("compare", "--suite", "rtp,mmlu", "--out", tmp_path / "a")
    assert_one_line_error(result, "unknown suite 'mmlu'; suites: rtp, toxigen")
    result = surgery("compare", "--methods", "surgery", "--set", "dinm.num_steps=1", "--out", tmp_path / "b")
    assert_one_line_error(result, "--set for 'dinm', which is not among --methods")
    result = surgery("compare", "--methods", "surgery", "--set", "surgery.nope=1", "--out", tmp_path / "c")
    assert_one_line_error(result, "unknown key 'nope'")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- the prompt baseline's evaluation


def test_an_instruction_conditions_ppl_and_kl_on_the_same_tokens(char_tokenizer):
    from surgery_plugin.evaluation.generation import perplexity

    model, tok = make_tiny("llama"), char_tokenizer
    texts = ["the weather is nice today", "i love sunny days and walks"]
    plain = perplexity(model, tok, texts, progress=False)
    prefixed = perplexity(model, tok, texts, progress=False, prefix="be kind. ")
    assert prefixed["n_tokens"] == plain["n_tokens"]  # the instruction's own tokens are not scored
    assert prefixed["token_perplexity"] != plain["token_perplexity"]
    # the next token after "instruction + prompt" is the next token after that whole text
    together = next_token_logprobs(model, tok, ["be kind. hello"], progress=False)
    torch.testing.assert_close(
        next_token_logprobs(model, tok, ["hello"], progress=False, prefix="be kind. "), together
    )
    kl = first_token_kl(model, tok, ["hello", "good day"], prefix="be kind. ", progress=False)
    assert float(kl.min()) > 0  # without a reference: the same model without the instruction


def test_an_instruction_is_a_system_turn_for_a_chat_model(smollm2):
    from surgery_plugin.evaluation.generation import format_prompts, instruction_prefix

    _, tok = smollm2
    texts, chat = format_prompts(tok, ["How do I hurt someone?"], system="Be safe.")
    assert chat and "Be safe." in texts[0] and texts[0].index("Be safe.") < texts[0].index("How do I hurt")
    prefix = instruction_prefix(tok, "Be safe.")
    assert prefix.startswith("<|im_start|>system") and prefix.rstrip().endswith("<|im_end|>")


# ---------------------------------------------------------------------------- saved edits, unit level


def _logits(model, prompts=("hello there", "the weather is")):
    ids = [torch.tensor([[5 + (ord(c) % 80) for c in p]]) for p in prompts]
    with torch.no_grad():
        return torch.cat([model(input_ids=i).logits[:, -1] for i in ids])


def test_saved_tensors_reload_bitwise_and_check_the_base(tmp_path):
    model = make_tiny("llama")
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(model.named_parameters())[name]
    originals = {name: param.detach().clone()}
    with torch.no_grad():
        param.add_(torch.randn_like(param) * 0.1)  # a dense change, as DINM / FT make
    expected = _logits(model)
    folder = save_tensors_edit(model, originals, tmp_path / "dense", "tiny-llama", {"method": "test"})
    assert read_edit_record(folder)["kind"] == "tensors"
    fresh = make_tiny("llama")
    assert not torch.equal(_logits(fresh), expected)
    reloaded, _ = load_saved_edit(fresh, folder)
    assert torch.equal(_logits(reloaded), expected)
    with pytest.raises(SurgeryError, match="made for other weights"):
        load_saved_edit(make_tiny("llama", seed=1), folder)


def test_saved_low_rank_edit_is_a_peft_lora_of_the_change_rank(tmp_path):
    from peft import PeftModel

    model = make_tiny("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    param = dict(model.named_parameters())[name]
    originals = {name: param.detach().clone()}
    with torch.no_grad():  # two rank-one updates, as two sequential ROME edits of one layer make
        param.add_(torch.randn(param.shape[0], 2) @ torch.randn(2, param.shape[1]) * 0.3)
    expected = _logits(model)
    folder = save_low_rank_edit(model, originals, tmp_path / "lora", "tiny-llama", max_rank=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (
        config["r"] == 2 and config["lora_alpha"] == 2 and config["target_modules"] == ["model.layers.0.mlp.down_proj"]
    )
    reloaded, record = load_saved_edit(make_tiny("llama"), folder)
    assert isinstance(reloaded, PeftModel) and record["kind"] == "lora"
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-4, atol=1e-4)
    with reloaded.disable_adapter():
        torch.testing.assert_close(_logits(reloaded), _logits(make_tiny("llama")), rtol=0, atol=0)


def test_prompt_edit_holds_only_the_instruction(tmp_path):
    folder = save_prompt_edit(tmp_path / "prompt", "Be kind.", "tiny-llama")
    model = make_tiny("llama")
    same, record = load_saved_edit(model, folder)
    assert (
        same is model and record["instruction"] == "Be kind." and [p.name for p in folder.iterdir()] == ["edit.json"]
    )


# ---------------------------------------------------------------------------- the driver on a tiny model


def _tiny_hparams(root, model_dir) -> None:
    common = dict(model_name=str(model_dir), device="cpu", model_parallel=False)
    modules = dict(
        rewrite_module_tmp="model.layers.{}.mlp.down_proj.weight",
        layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp",
        attn_module_tmp="model.layers.{}.self_attn",
        ln_f_module="model.norm",
        lm_head_module="lm_head",
    )
    files = {
        "Surgery": dict(
            alg_name="Surgery",
            max_length=64,
            batch_size=1,
            probe_data="davidson",
            probe_layer=1,
            probe_max_per_class=20,
            probe_epochs=2,
            feature_batch_size=8,
            top_k=0.2,
            alpha=0.5,
            normalize=True,
            **common,
        ),
        "DINM": dict(
            alg_name="DINM",
            model_class="LlamaForCausalLM",
            tokenizer_class="AutoTokenizer",
            suffix_system_prompt="Please give the right response:",
            layers=[],
            num_steps=2,
            max_length=256,
            max_output_length=16,
            lr=1e-3,
            weight_decay=0,
            kl_factor=0.1,
            norm_constraint=False,
            **modules,
            **common,
        ),
        "FT": dict(
            alg_name="FT",
            layers=[1],
            num_steps=2,
            batch_size=1,
            max_length=40,
            lr=1e-3,
            weight_decay=0,
            kl_factor=0,
            norm_constraint=False,
            objective_optimization="prompt_last",
            **modules,
            **common,
        ),
        "ROME": dict(  # layer 5 of a 2-layer model: this method fails in the middle of the run
            alg_name="ROME",
            stats_dir="./stats",
            layers=[5],
            fact_token="subject_last",
            v_num_grad_steps=1,
            v_lr=0.5,
            v_loss_layer=1,
            v_weight_decay=1e-3,
            clamp_norm_factor=4,
            kl_factor=0.0625,
            mom2_adjustment=False,
            context_template_length_params=[],
            mom2_dataset="wikipedia",
            mom2_n_samples=1000,
            mom2_dtype="float32",
            **{k: v.removesuffix(".weight") for k, v in modules.items()},
            **common,
        ),
    }
    import yaml

    for method, config in files.items():
        (root / method).mkdir(parents=True)
        (root / method / "tiny.yaml").write_text(yaml.safe_dump(config))


def _kl_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [r for r in rows if r["suite"] == "kl"]


def _check_saved_edits_reproduce_the_evaluated_models(out, model_name, names) -> None:
    """Load every saved edit onto a fresh base model: per-prompt KL as in the run's samples."""
    from surgery_plugin.models import load_model

    changed = []
    for name in names:
        rows = _kl_rows(out / "runs" / name)
        prompts = [r["prompt"] for r in rows]
        model, tok = load_model(model_name)
        reference = next_token_logprobs(model, tok, prompts, progress=False)
        edited, record = load_saved_edit(model, out / "edits" / name)
        assert record["kind"] in ("surgery", "lora", "tensors"), name
        kl = first_token_kl(edited, tok, prompts, reference=reference, progress=False)
        torch.testing.assert_close(kl, torch.tensor([r["kl"] for r in rows]), rtol=1e-3, atol=1e-5, msg=name)
        changed.append(float(kl.max()) > 0)
    # a one-step FT edit of a tiny random model may leave these 3 prompts' fp32 distributions unchanged
    assert any(changed), "no saved edit changes the benign next-token distribution"


@pytest.mark.real_model
def test_compare_on_a_tiny_model_runs_every_method_and_survives_a_failing_one(tmp_path, tiny_model_dir, data_dir):
    python = easyedit_python()
    hparams = tmp_path / "hparams"
    _tiny_hparams(hparams, tiny_model_dir)
    out = tmp_path / "run"
    run = _compare(
        python,
        tmp_path,
        "--model",
        tiny_model_dir,
        "--hparams-dir",
        hparams,
        "--data-dir",
        data_dir,
        "--judge",
        "profanity",
        "--records",
        "1",
        "--limit",
        "3",
        "--max-new-tokens",
        "4",
        "--alphas",
        "0.25,1.0",
        "--out",
        out,
    )
    assert run.returncode == 1, run.stderr[-4000:]
    assert "1 method(s) failed: rome" in run.stderr
    result = json.loads((out / "compare.json").read_text())
    methods = result["methods"]
    assert set(methods) == ROWS
    assert methods["rome"]["status"] == "failed" and methods["rome"]["error"] and not methods["rome"]["suites"]
    assert not (out / "edits" / "rome").exists() and not (out / "runs" / "rome").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # nothing half-written
    for name in ROWS - {"rome"}:
        m = methods[name]
        assert m["status"] == "ok", (name, m["error"])
        assert set(m["suites"]) == {"rtp", "toxigen", "safeedit", "ppl", "kl"}, name
        assert COST_KEYS <= set(m["cost"]), name
        assert m["suites"]["safeedit"]["n"] == 1 and m["suites"]["rtp"]["n"] == 3
    edits = ROWS - {"rome", "unedited", "prompt"}
    for name in edits:
        cost, edit = methods[name]["cost"], methods[name]["edit"]
        assert cost["changed_params"] > 0 and cost["edit_bytes"] > 0 and cost["edit_seconds"] > 0
        assert cost["peak_rss_bytes"] > 0
        assert edit["reload_max_abs_logprob_diff"] < 1e-4, name
        assert 0 <= methods[name]["suites"]["kl"]["mean_kl"] < 1, name
    # a one-step edit of a tiny random model can leave 3 prompts' fp32 next-token distributions unchanged,
    # but not every method's: the KL reference is really the unedited model
    assert max(methods[name]["suites"]["kl"]["mean_kl"] for name in edits) > 0
    for name in ("dinm", "ft-l", "ft-m"):  # only the changed tensors: one down projection each
        from safetensors import safe_open

        with safe_open(str(out / "edits" / name / EDITED_TENSORS), "pt") as f:
            assert [k.endswith("mlp.down_proj.weight") for k in f.keys()] == [True], name
    assert methods["dinm"]["edit"]["located_layers"] and methods["dinm"]["suites"]["safeedit"]["located_layers"]
    assert methods["prompt"]["suites"]["kl"]["mean_kl"] > 0  # the instruction changes the next-token distribution
    assert methods["unedited"]["suites"]["kl"]["mean_kl"] == pytest.approx(0, abs=1e-6)
    assert [c["alpha"] for c in methods["surgery-shipped"]["curve"]] == [0.25, 1.0]
    assert methods["surgery-records"]["edit"]["edit_records"] == result["settings"]["edit_records"]["ids"]
    assert set(result["settings"]["edit_records"]["ids"]).isdisjoint(result["settings"]["instance_records"]["ids"])
    table = (out / "compare.md").read_text()
    for m in methods.values():
        assert m["label"] in table
    assert "failed" in table and "Surgery's cost relative to each baseline" in table
    assert {(s, b) for s, b, _ in cost_ratios(result)} == {
        (s, b) for s in ("surgery-shipped", "surgery-records") for b in ("dinm", "ft-l", "ft-m")
    }
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "logs").exists()  # EasyEdit's log files stay inside the run folder
    _check_saved_edits_reproduce_the_evaluated_models(out, str(tiny_model_dir), sorted(edits))


# ---------------------------------------------------------------------------- EasyEdit's baselines on SmolLM2


@pytest.mark.real_model
def test_easyedit_baselines_on_smollm2_edit_save_and_reload(tmp_path, data_dir):
    """The shipped DINM / ROME / FT YAMLs on the real model, one record, step counts cut for CI."""
    python = easyedit_python()
    out = tmp_path / "run"
    run = _compare(
        python,
        tmp_path,
        "--methods",
        "dinm,rome,ft-l,ft-m",
        "--suite",
        "rtp,kl",
        "--judge",
        "profanity",
        "--records",
        "1",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--data-dir",
        data_dir,
        "--set",
        "dinm.num_steps=1",
        "--set",
        "rome.v_num_grad_steps=1",
        "--set",
        "ft-l.num_steps=1",
        "--set",
        "ft-m.num_steps=1",
        "--out",
        out,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    methods = json.loads((out / "compare.json").read_text())["methods"]
    kinds = {"dinm": "tensors", "rome": "lora", "ft-l": "tensors", "ft-m": "tensors"}
    for name, kind in kinds.items():
        m = methods[name]
        assert m["status"] == "ok", (name, m["error"])
        assert m["edit"]["kind"] == kind and len(m["edit"]["tensors"]) == 1, name
        assert m["cost"]["changed_params"] > 0 and m["edit"]["reload_max_abs_logprob_diff"] < 1e-4, name
        assert m["suites"]["kl"]["mean_kl"] > 0, name
    assert json.loads((out / "edits" / "rome" / "adapter_config.json").read_text())["r"] == 1  # one ROME edit: rank 1
    assert methods["rome"]["edit"]["tensors"] == ["model.layers.5.mlp.down_proj.weight"]
    assert methods["ft-l"]["edit"]["tensors"] == ["model.layers.19.mlp.down_proj.weight"]
    _check_saved_edits_reproduce_the_evaluated_models(out, "smollm2-135m", sorted(kinds))
