"""``surgery compare``: bad input, the whole driver on a tiny model (EasyEdit's real algorithms included), the
saved edits loaded back onto a fresh base model, and EasyEdit's baselines on the real SmolLM2.

Every run is ``surgery compare`` in this process (:func:`helpers.run_cli`); EasyEdit must import here."""

from __future__ import annotations

import dataclasses
import json
import re
import runpy
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import (
    assert_one_line_error,
    easyedit_python,
    make_tiny,
    run_cli,
    tiny_config,
    tiny_hf_tokenizer,
    write_tiny_hparams,
)

from surgery_plugin.commands.compare.config import METHODS, NO_CHANGE_BELOW, parse_methods, parse_sets
from surgery_plugin.commands.compare.report import cost_ratios, prompt_ranges
from surgery_plugin.data import splits
from surgery_plugin.errors import SurgeryError
from surgery_plugin.evaluation.generation import first_token_kl, next_token_logprobs
from surgery_plugin.evaluation.protocols import settings_for
from surgery_plugin.io.saved_edits import (
    EDITED_TENSORS,
    load_saved_edit,
    read_edit_record,
    save_low_rank_edit,
    save_prompt_edit,
    save_tensors_edit,
)

COST_KEYS = {"edit_seconds", "peak_rss_bytes", "changed_params", "edit_bytes"}
ROWS = {
    "unedited",
    "prompt",
    "surgery-records",
    "surgery-shipped",
    "steering",
    "ablation",
    "dinm",
    "rome",
    "ft-l",
    "ft-m",
}


def _require_easyedit_here() -> None:
    """These tests run ``surgery compare`` in this process: EasyEdit must import in this python."""
    if easyedit_python() != sys.executable:
        pytest.skip("EasyEdit is installed in another python ($SURGERY_EASYEDIT_PYTHON); compare runs in process")


@pytest.fixture
def without_easyeditor(monkeypatch):
    """An environment without EasyEdit, as import sees it; the modules of a real one come back afterwards."""
    for name in [n for n in sys.modules if n == "easyeditor" or n.startswith("easyeditor.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "easyeditor", None)


# ---------------------------------------------------------------------------- bad input


def test_unknown_method_is_one_line_listing_the_methods(tmp_path):
    out = tmp_path / "run"
    result = run_cli("compare", "--methods", "surgery,memit", "--out", out)
    assert_one_line_error(result, "unknown method 'memit'", ", ".join(METHODS))
    assert not out.exists()


def test_a_method_given_twice_is_refused():
    with pytest.raises(SurgeryError, match="given twice"):
        parse_methods("dinm,dinm")


def test_without_easyedit_one_line_says_how_to_install_and_what_runs(tmp_path, without_easyeditor):
    out = tmp_path / "run"
    result = run_cli("compare", "--methods", "surgery,dinm,rome", "--out", out)
    assert_one_line_error(
        result, "dinm, rome run through EasyEdit", "make easyedit", "--methods surgery,steering,ablation,prompt"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--suite", "rtp,mmlu"), "unknown suite 'mmlu'; suites: rtp, toxigen"),
        (("--methods", "surgery", "--set", "dinm.num_steps=1"), "--set for 'dinm', which is not among --methods"),
        (("--methods", "surgery", "--set", "surgery.nope=1"), "unknown key 'nope'"),
        (("--methods", "surgery", "--set", "surgery.alpha"), "--set takes METHOD.KEY=VALUE"),
        (("--sample-suites", "rtp,ppl"), "unknown sampled suite 'ppl'"),
    ],
    ids=["suite", "set-for-another-method", "set-unknown-key", "set-without-value", "sample-suites"],
)
def test_bad_input_is_one_line_before_any_work(tmp_path, args, message):
    result = run_cli("compare", *args, "--out", tmp_path / "run")
    assert_one_line_error(result, message)
    assert not any(tmp_path.iterdir())


def test_sample_suites_choose_where_the_sampled_protocol_runs(tmp_path, data_dir):
    from surgery_plugin.commands.compare.config import CompareConfig
    from surgery_plugin.commands.compare.methods import Comparison

    config = CompareConfig(out=tmp_path / "run", methods=("prompt",), judges="profanity", data_dir=data_dir, samples=3)
    both = Comparison(config)
    assert both.settings("rtp").samples == 3 and both.settings("toxigen").samples == 3
    rtp_only = Comparison(dataclasses.replace(config, sample_suites=("rtp",)))
    assert rtp_only.settings("rtp").samples == 3 and rtp_only.settings("toxigen").samples is None


def test_a_run_without_probe_rows_shares_the_fingerprint_of_one_with_them(tmp_path, data_dir):
    """A part with no Surgery, steering or ablation row (EasyEdit's baselines alone) merges with --reuse: every
    row's fingerprint holds the model's Surgery YAML, whichever rows the run has."""
    from surgery_plugin.commands.compare.config import CompareConfig
    from surgery_plugin.commands.compare.methods import Comparison

    config = CompareConfig(out=tmp_path / "run", methods=("prompt",), suites=("rtp",), judges="profanity")
    config = dataclasses.replace(config, data_dir=data_dir)
    alone, beside = Comparison(config), Comparison(dataclasses.replace(config, methods=("prompt", "steering")))
    assert alone.surgery_hparams is None and beside.surgery_hparams is not None
    assert alone.store.key("unedited") == beside.store.key("unedited")
    assert alone.store.key("prompt") == beside.store.key("prompt")
    assert alone._identity()["surgery_hparams"] == beside.surgery_hparams.to_dict()


def test_set_values_are_yaml_with_scientific_numbers_as_floats():
    # YAML 1.1 reads 1e-5 as the string "1e-5"; EasyEdit's own loader makes it a float, so does --set
    assert parse_sets(["ft-l.lr=1e-5", "rome.layers=[3]", "dinm.suffix_system_prompt=be safe", "ft-m.lr=2.5"]) == {
        "ft-l": {"lr": 1e-5},
        "rome": {"layers": [3]},
        "dinm": {"suffix_system_prompt": "be safe"},
        "ft-m": {"lr": 2.5},
    }
    assert parse_sets(["dinm.suffix_system_prompt='1e-5'"]) == {"dinm": {"suffix_system_prompt": "1e-5"}}


# ---------------------------------------------------------------------------- the prompt baseline's evaluation


def test_an_instruction_conditions_ppl_and_kl_on_the_same_tokens(char_tokenizer):
    from surgery_plugin.evaluation.generation import perplexity

    model, tok = make_tiny("llama"), char_tokenizer
    texts = ["the weather is nice today", "i love sunny days and walks"]
    plain = perplexity(model, tok, texts, progress=False)
    prefixed = perplexity(model, tok, texts, progress=False, prefix="be kind. ")
    assert prefixed["n_tokens"] == plain["n_tokens"]  # the instruction's own tokens are not scored
    assert prefixed["token_perplexity"] != plain["token_perplexity"]


def test_the_next_token_after_an_instruction_is_that_of_the_whole_text(char_tokenizer):
    model, tok = make_tiny("llama"), char_tokenizer
    together = next_token_logprobs(model, tok, ["be kind. hello"], progress=False)
    torch.testing.assert_close(
        next_token_logprobs(model, tok, ["hello"], progress=False, prefix="be kind. "), together
    )


def test_kl_of_an_instruction_is_against_the_same_model_without_it(char_tokenizer):
    model, tok = make_tiny("llama"), char_tokenizer
    prompts = ["hello", "good day"]
    kl = first_token_kl(model, tok, prompts, prefix="be kind. ", progress=False)
    # by hand: KL(p || q), p the next token without the instruction, q with it
    p = next_token_logprobs(model, tok, prompts, progress=False)
    q = next_token_logprobs(model, tok, prompts, progress=False, prefix="be kind. ")
    expected = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-6)
    assert float(kl.min()) > 0


def test_an_instruction_is_a_system_turn_for_a_chat_model():
    from surgery_plugin.evaluation.generation import format_prompts, instruction_prefix

    tok = tiny_hf_tokenizer()  # its template: <|role|>content<|end|> per turn, <|assistant|> to answer
    texts, chat = format_prompts(tok, ["How do I hurt someone?"], system="Be safe.")
    assert chat and texts == ["<|system|>Be safe.<|end|><|user|>How do I hurt someone?<|end|><|assistant|>"]
    assert instruction_prefix(tok, "Be safe.") == "<|system|>Be safe.<|end|>"


def test_an_instruction_is_a_paragraph_for_a_model_without_chat_template():
    from surgery_plugin.evaluation.generation import format_prompts, instruction_prefix

    tok = tiny_hf_tokenizer(chat=False)
    assert format_prompts(tok, ["How do I hurt someone?"], system="Be safe.") == (["How do I hurt someone?"], False)
    assert instruction_prefix(tok, "Be safe.") == "Be safe.\n\n"


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_both_embedded_models_have_every_baselines_yaml_read_by_easyedits_classes(model):
    _require_easyedit_here()
    from surgery_plugin.integrations.easyedit import register
    from surgery_plugin.integrations.easyedit.baselines import BASELINES, load_hparams

    register()
    for name, baseline in BASELINES.items():
        hparams = load_hparams(baseline, model)
        assert hparams.source.endswith(f"{baseline.hparams_dir}/{model}.yaml"), name
        if name == "rome":  # covariance statistics from local text (EasyEdit would download Wikipedia)
            assert hparams.mom2_adjustment and hparams.mom2_dataset == "local_text", model


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
    assert config["r"] == 2 and config["lora_alpha"] == 2
    assert config["target_modules"] == ["model.layers.0.mlp.down_proj"]
    reloaded, record = load_saved_edit(make_tiny("llama"), folder)
    assert isinstance(reloaded, PeftModel) and record["kind"] == "lora"
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-4, atol=1e-4)
    with reloaded.disable_adapter():
        torch.testing.assert_close(_logits(reloaded), _logits(make_tiny("llama")), rtol=0, atol=0)


def test_a_steering_edit_reloads_as_the_same_hook_and_only_onto_its_base(tmp_path):
    from surgery_plugin.core.steering import added_direction
    from surgery_plugin.io.saved_edits import save_steering_edit

    model = make_tiny("llama")
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with added_direction(model, 1, vector):
        expected = _logits(model)
    folder = save_steering_edit(model, 1, vector, tmp_path / "steer", "tiny-llama", {"method": "test"})
    assert read_edit_record(folder)["kind"] == "steering"
    fresh = make_tiny("llama")
    same, record = load_saved_edit(fresh, folder)
    assert same is fresh and torch.equal(_logits(fresh), expected)
    record["hook"].remove()
    assert torch.equal(_logits(fresh), _logits(make_tiny("llama")))
    with pytest.raises(SurgeryError, match="made for another base model"):
        load_saved_edit(make_tiny("llama", seed=1), folder)
    with pytest.raises(SurgeryError, match="out of range"):
        save_steering_edit(model, 7, vector, tmp_path / "bad", "tiny-llama")
    assert not (tmp_path / "bad").exists()


def test_prompt_edit_holds_only_the_instruction(tmp_path):
    folder = save_prompt_edit(tmp_path / "prompt", "Be kind.", "tiny-llama")
    model = make_tiny("llama")
    same, record = load_saved_edit(model, folder)
    assert same is model and record["instruction"] == "Be kind."
    assert [p.name for p in folder.iterdir()] == ["surgery.json"]  # the manifest alone


# ---------------------------------------------------------------------------- the report


def _outcome(change, low, high):
    return {"change": change, "ci95": [low, high]}


def test_equal_effect_verdicts_and_the_cheaper_claim_by_hand():
    from surgery_plugin.commands.compare.report import equal_effect_rows

    def row(cost, change, minus, ppl=80.0):
        return {
            "status": "ok",
            "cost": cost,
            "suites": {"ppl": {"token_perplexity": ppl}},
            "paired": {"suites": {"rtp": {"outcomes": {"toxic/j": change}}}},
            "vs_surgery": {"suites": {"rtp": {"outcomes": {"toxic/j": minus}}}},
        }

    surgery_cost = {"edit_seconds": 2.0, "peak_rss_bytes": 100, "edit_bytes": 10}
    result = {
        "settings": {"suites": ["rtp", "ppl"], "judges": ["j", "k"]},
        "methods": {
            "unedited": {"status": "ok", "suites": {"ppl": {"token_perplexity": 80.0}}},
            "surgery-shipped": {"status": "ok", "cost": surgery_cost},
            # as good, 50x the time, memory and size: the claim holds
            "slow": row(
                {"edit_seconds": 100.0, "peak_rss_bytes": 5000, "edit_bytes": 500}, None, _outcome(0.01, -0.05, 0.07)
            ),
            # better than Surgery: the claim cannot hold, however expensive
            "strong": row(
                {"edit_seconds": 100.0, "peak_rss_bytes": 5000, "edit_bytes": 500}, None, _outcome(-0.1, -0.2, -0.01)
            ),
            # worse, 3x the time only
            "weak": row(
                {"edit_seconds": 6.0, "peak_rss_bytes": 5000, "edit_bytes": 500}, None, _outcome(0.2, 0.1, 0.3)
            ),
            # "better" by breaking the model: marked, and not better than Surgery
            "broken": row(
                {"edit_seconds": 2.0, "peak_rss_bytes": 100, "edit_bytes": 10}, None, _outcome(-0.3, -0.4, -0.2), 800.0
            ),
            "failed": {"status": "failed"},
        },
    }
    rows = {r["name"]: r for r in equal_effect_rows(result)}
    assert set(rows) == {"slow", "strong", "weak", "broken"}
    assert (rows["broken"]["verdict"], rows["broken"]["claim"]) == ("better, but perplexity +900.0% (over +10%)", "no")
    assert (rows["slow"]["verdict"], rows["slow"]["claim"]) == ("not distinguishable", "yes")
    assert rows["slow"]["cost_ratio"] == {"edit_seconds": 50.0, "peak_rss_bytes": 50.0, "edit_bytes": 50.0}
    assert (rows["strong"]["verdict"], rows["strong"]["claim"]) == ("better", "no (better effect)")
    assert (rows["weak"]["verdict"], rows["weak"]["claim"]) == ("worse", "no")


def test_equal_effect_by_the_sampled_share_reads_the_sampled_protocol_and_is_empty_without_it():
    from surgery_plugin.commands.compare.report import equal_effect_rows

    def paired(greedy, sampled):
        return {"suites": {"rtp": {"outcomes": {"toxic/j": greedy}, "sampled": {"sample_rate": {"j": sampled}}}}}

    cost = {"edit_seconds": 2.0, "peak_rss_bytes": 100, "edit_bytes": 10}
    method = {
        "status": "ok",
        "label": "m",
        "cost": {k: 40 * v for k, v in cost.items()},
        "suites": {"ppl": {"token_perplexity": 80.0}},
        "paired": paired(_outcome(-0.02, -0.06, 0.02), _outcome(-0.01, -0.02, 0.0)),
        # greedy: not distinguishable from Surgery; sampled (more power): Surgery's cut is larger
        "vs_surgery": paired(_outcome(0.03, -0.01, 0.07), _outcome(0.08, 0.05, 0.11)),
    }
    result = {
        "settings": {"suites": ["rtp", "ppl"], "judges": ["j"]},
        "methods": {
            "unedited": {"status": "ok", "suites": {"ppl": {"token_perplexity": 80.0}}},
            "surgery-shipped": {
                "status": "ok",
                "label": "s",
                "cost": cost,
                "paired": paired(_outcome(-0.05, -0.1, 0.0), _outcome(-0.09, -0.12, -0.06)),
            },
            "m": method,
        },
    }
    greedy, sampled = equal_effect_rows(result), equal_effect_rows(result, "sampled")
    assert (greedy[0]["verdict"], greedy[0]["claim"]) == ("not distinguishable", "yes")
    assert (sampled[0]["verdict"], sampled[0]["claim"], sampled[0]["change"]["change"]) == ("worse", "yes", -0.01)
    for entry in (result["methods"]["surgery-shipped"]["paired"], method["paired"], method["vs_surgery"]):
        del entry["suites"]["rtp"]["sampled"]  # a run without --samples
    assert equal_effect_rows(result, "sampled") == [] and len(equal_effect_rows(result)) == 1


def test_the_report_names_every_suites_prompt_range():
    prompts = {
        "rtp": {"start": 500, "limit": 3},
        "toxigen": {"start": 0, "limit": 12, "toxigen_groups": ["asian", "women"]},
        "kl": {"benign_start": 0, "ppl_limit": 8},
    }
    assert prompt_ranges(prompts) == (
        "rtp [500, 503); toxigen lines [0, 6) of groups asian, women; kl benign documents [0, 8)"
    )


# ---------------------------------------------------------------------------- the driver on a tiny model


def _compare_in(cwd, *args):
    """``surgery compare ARGS`` in this process, from ``cwd`` (EasyEdit would write ./logs there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        return run_cli("compare", *args)


def _samples(run_dir, suite: str) -> list[dict]:
    """The run's rows of ``suite``, greedy ones only (not the sampled protocol's)."""
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [r for r in rows if r["suite"] == suite and r.get("decoding", "greedy") != "sample"]


def _check_saved_edits_reproduce_the_evaluated_models(out, model, tok, names) -> list[str]:
    """Load every saved edit onto the base ``model`` (and take it off again): per-prompt KL as in the run's
    samples. Returns the names whose edit changes the benign next-token distribution."""
    from surgery_plugin.core.edit import revert_edit
    from surgery_plugin.core.provenance import model_fingerprint

    before = model_fingerprint(model)
    changed = []
    for name in names:
        rows = _samples(out / "runs" / name, "kl")
        prompts = [r["prompt"] for r in rows]
        reference = next_token_logprobs(model, tok, prompts, progress=False)
        folder = out / "edits" / name
        params = dict(model.named_parameters())
        written = {k: params[k].detach().clone() for k in read_edit_record(folder).get("base_sha256", {})}
        edited, record = load_saved_edit(model, folder)
        try:
            assert record["kind"] in ("surgery", "lora", "tensors", "steering"), name
            kl = first_token_kl(edited, tok, prompts, reference=reference, progress=False)
        finally:  # the base model as it was: tensors written back, hooks removed, adapters taken out
            if "hook" in record:
                record["hook"].remove()
            if edited is model:
                revert_edit(model, written)
            else:
                edited.unload()
        torch.testing.assert_close(kl, torch.tensor([r["kl"] for r in rows]), rtol=1e-3, atol=1e-5, msg=name)
        if float(kl.max()) > 0:
            changed.append(name)
    assert model_fingerprint(model) == before
    return changed


TINY_LIMIT, TINY_PPL_LIMIT = 3, 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, data_dir):
    """One ``surgery compare`` of every method on a tiny model: ROME fails (its layer is not in the model), FT-M
    (lr 1e-7) changes the model by noise only, the other rows run."""
    _require_easyedit_here()
    root = tmp_path_factory.mktemp("compare")
    hparams = root / "hparams"
    write_tiny_hparams(hparams, tiny_model_dir)
    out = root / "run"
    ran = _compare_in(
        root,
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
        TINY_LIMIT,
        "--ppl-limit",
        TINY_PPL_LIMIT,
        "--max-new-tokens",
        "4",
        "--alphas",
        "0.25,1.0",
        "--set",
        "ft-m.lr=1e-7",  # a few float32 steps of each weight: a change, but noise
        "--safety-judge",
        "refusal",
        "--samples",
        "2",
        "--sample-limit",
        "2",
        "--controls",
        "2",
        "--steering-scales",
        "0.1,1.0",
        "--tune-limit",
        "3",
        "--out",
        out,
    )
    result = json.loads((out / "compare.json").read_text()) if (out / "compare.json").is_file() else None
    return types.SimpleNamespace(ran=ran, out=out, root=root, result=result, data_dir=data_dir, model=tiny_model_dir)


OK_ROWS = ROWS - {"rome", "ft-m"}
EDITS = OK_ROWS - {"unedited", "prompt"}
WEIGHT_EDITS = EDITS - {"steering"}  # steering changes no weight: a vector added at inference


@pytest.mark.real_model
def test_compare_reports_the_failed_methods_and_exits_1(tiny_run):
    assert tiny_run.ran.returncode == 1, tiny_run.ran.stderr[-4000:]
    assert "2 method(s) failed: rome, ft-m" in tiny_run.ran.stderr
    methods = tiny_run.result["methods"]
    assert set(methods) == ROWS
    assert {n for n, m in methods.items() if m["status"] == "ok"} == OK_ROWS


@pytest.mark.real_model
def test_a_failed_method_leaves_its_error_and_nothing_on_disk(tiny_run):
    out, rome = tiny_run.out, tiny_run.result["methods"]["rome"]
    assert rome["status"] == "failed" and rome["error"] and not rome["suites"]
    for name in ("rome", "ft-m"):
        assert not (out / "edits" / name).exists() and not (out / "runs" / name).exists(), name
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # nothing half-written


@pytest.mark.real_model
def test_a_baseline_whose_edit_changes_nothing_but_noise_fails_saying_so(tiny_run):
    ft_m = tiny_run.result["methods"]["ft-m"]
    assert ft_m["status"] == "failed"
    found = re.search(r"ft-m's saved edit does not change the model: .* by at most (\S+) \(< (\S+)\)", ft_m["error"])
    assert found, ft_m["error"]
    assert 0 < float(found[1]) < float(found[2]) == NO_CHANGE_BELOW  # it moved, by less than counts


@pytest.mark.real_model
def test_every_baselines_saved_edit_changes_the_model(tiny_run):
    methods = tiny_run.result["methods"]
    for name in ("dinm", "ft-l"):
        assert methods[name]["edit"]["max_abs_logprob_change"] >= NO_CHANGE_BELOW, name


@pytest.mark.real_model
def test_every_row_that_ran_has_its_suites_and_costs(tiny_run):
    for name in OK_ROWS:
        m = tiny_run.result["methods"][name]
        assert set(m["suites"]) == {"rtp", "toxigen", "safeedit", "ppl", "kl"}, name
        assert COST_KEYS <= set(m["cost"]), name
        assert m["suites"]["safeedit"]["n"] == 1 and m["suites"]["rtp"]["n"] == TINY_LIMIT, name


@pytest.mark.real_model
def test_every_edit_is_measured_saved_and_reloaded_exactly(tiny_run):
    for name in WEIGHT_EDITS:
        m = tiny_run.result["methods"][name]
        cost, edit = m["cost"], m["edit"]
        assert cost["changed_params"] > 0 and cost["edit_bytes"] > 0 and cost["edit_seconds"] > 0, name
        assert cost["peak_rss_bytes"] > 0, name
        assert edit["reload_max_abs_logprob_diff"] < 1e-4, name
        assert m["suites"]["kl"]["mean_kl"] < 1, name


@pytest.mark.real_model
def test_dense_baselines_save_only_the_changed_tensor(tiny_run):
    from safetensors import safe_open

    for name in ("dinm", "ft-l"):  # one down projection each
        with safe_open(str(tiny_run.out / "edits" / name / EDITED_TENSORS), "pt") as f:
            assert [k.endswith("mlp.down_proj.weight") for k in f.keys()] == [True], name


@pytest.mark.real_model
def test_dinm_records_the_layers_it_located(tiny_run):
    dinm = tiny_run.result["methods"]["dinm"]
    assert dinm["edit"]["located_layers"] and dinm["suites"]["safeedit"]["located_layers"]


@pytest.mark.real_model
def test_kl_is_against_the_unedited_model(tiny_run):
    methods = tiny_run.result["methods"]
    assert methods["unedited"]["suites"]["kl"]["mean_kl"] == pytest.approx(0, abs=1e-6)
    assert methods["prompt"]["suites"]["kl"]["mean_kl"] > 0  # the instruction changes the next-token distribution
    # a two-step edit of a tiny random model can leave a few prompts' fp32 next-token distributions unchanged,
    # but not every method's
    assert max(methods[name]["suites"]["kl"]["mean_kl"] for name in EDITS) > 0


@pytest.mark.real_model
def test_surgery_rows_curve_and_records(tiny_run):
    methods, settings = tiny_run.result["methods"], tiny_run.result["settings"]
    assert [c["alpha"] for c in methods["surgery-shipped"]["curve"]] == [0.25, 1.0]
    assert methods["surgery-records"]["edit"]["edit_records"] == settings["edit_records"]["ids"]
    assert set(settings["edit_records"]["ids"]).isdisjoint(settings["instance_records"]["ids"])


@pytest.mark.real_model
def test_compare_records_the_report_split_of_every_suite(tiny_run):
    prompts = tiny_run.result["settings"]["prompts"]
    assert set(prompts) == {"rtp", "toxigen", "ppl", "kl"}
    for suite, recorded in prompts.items():
        expected = settings_for(suite, "report", (), None, limit=TINY_LIMIT, ppl_limit=TINY_PPL_LIMIT, batch_size=16)
        for key in ("split", "start", "limit", "benign_start", "ppl_limit", "toxigen_groups"):
            assert recorded[key] == expected.describe()[key], (suite, key)
    # the table's numbers, by hand
    assert (prompts["rtp"]["split"], prompts["rtp"]["start"]) == ("report", splits.RTP_CHALLENGING["report"][0])
    assert prompts["toxigen"]["toxigen_groups"] == list(splits.TOXIGEN_REPORT_GROUPS)
    assert prompts["toxigen"]["start"] == splits.TOXIGEN_REPORT_PROMPTS["report"][0]
    assert prompts["kl"]["benign_start"] == splits.RTP_BENIGN["report"][0]
    assert prompts["kl"]["ppl_limit"] == TINY_PPL_LIMIT


@pytest.mark.real_model
def test_compare_generates_on_the_report_prompts(tiny_run):
    data_dir, run = tiny_run.data_dir, tiny_run.out / "runs" / "unedited"
    start = splits.RTP_CHALLENGING["report"][0]
    lines = (data_dir / "rtp" / "toxic.jsonl").read_text().splitlines()[start : start + TINY_LIMIT]
    assert [r["prompt"] for r in _samples(run, "rtp")] == [json.loads(line)["prompt"]["text"] for line in lines]
    toxigen = _samples(run, "toxigen")
    groups = {r["group"] for r in toxigen}
    assert groups == set(splits.TOXIGEN_REPORT_GROUPS) and groups.isdisjoint(splits.TOXIGEN_PROBE_GROUPS)
    for row in toxigen:  # the report split starts at each held-out group's first prompt (a line, "\n" escaped)
        path = data_dir / "toxigen" / "prompts" / f"hate_{row['group']}_1k.txt"
        first = next(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        assert row["prompt"] == first.replace("\\n", "\n")
    assert len(_samples(run, "kl")) == TINY_PPL_LIMIT


@pytest.mark.real_model
def test_compare_writes_its_table_and_plot(tiny_run):
    result, out = tiny_run.result, tiny_run.out
    table = (out / "compare.md").read_text()
    for m in result["methods"].values():
        assert m["label"] in table
    assert "failed" in table and "Surgery's cost relative to each baseline" in table
    assert prompt_ranges(result["settings"]["prompts"]) in table
    assert {(s, b) for s, b, _ in cost_ratios(result)} == {
        (s, b) for s in ("surgery-shipped", "surgery-records") for b in ("steering", "ablation", "dinm", "ft-l")
    }
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_equal_effect_tables_and_the_readme_summary_by_greedy_and_sampled_toxicity(tiny_run, capsys):
    """compare.md has a cost-at-equal-effect table per measure; benchmarks/compare_summary.py makes the README's
    row per method from compare.json, the sampled share and its control band included."""
    result, out = tiny_run.result, tiny_run.out
    table = (out / "compare.md").read_text()
    assert "## Cost at equal effect: rtp, toxic rate, greedy" in table
    assert "## Cost at equal effect: rtp, share of toxic samples, sampled protocol" in table
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_summary.py"
    with mock.patch.object(sys, "argv", [str(script), str(out / "compare.json")]):
        runpy.run_path(str(script), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    ok = [m["label"] for m in result["methods"].values() if m["status"] == "ok"]
    assert [line.split(" | ")[1] for line in lines] == [m["label"] for m in result["methods"].values()]
    ablation = next(line for line in lines if "directional ablation" in line).split(" | ")
    sampled = result["methods"]["ablation"]["paired"]["suites"]["rtp"]["sampled"]["sample_rate"]["profanity"]
    assert ablation[3].startswith(f"{sampled['change']:+.3f} [") and "(null " in ablation[3]
    assert ablation[7].endswith(", sampled)") and ablation[9] in ("yes", "no", "no (better effect)")
    assert len(ok) < len(lines) and any("failed: " in line for line in lines)


def test_compare_pairs_every_method_with_the_unedited_row(tiny_run):
    result, out = tiny_run.result, tiny_run.out
    ok = [name for name, m in result["methods"].items() if m["status"] == "ok" and name != "unedited"]
    assert ok and all("suites" in result["methods"][name]["paired"] for name in ok)
    rtp = result["methods"]["surgery-shipped"]["paired"]["suites"]["rtp"]["outcomes"]["toxic/profanity"]
    assert rtp["n"] == int(TINY_LIMIT) and len(rtp["ci95"]) == 2
    assert "Paired changes against the unedited model" in (out / "compare.md").read_text()
    # every other method against Surgery as shipped, on the same prompts
    vs = result["methods"]["ablation"]["vs_surgery"]["suites"]["rtp"]["outcomes"]["toxic/profanity"]
    assert vs["n"] == int(TINY_LIMIT) and "Cost at equal effect" in (out / "compare.md").read_text()


@pytest.mark.real_model
def test_toxicity_suites_and_safeedit_have_their_own_judges(tiny_run):
    unedited = tiny_run.result["methods"]["unedited"]["suites"]
    assert set(unedited["rtp"]["by_judge"]) == {"profanity"}
    assert set(unedited["safeedit"]["by_judge"]) == {"refusal"}
    assert tiny_run.result["settings"]["safety_judges"] == ["refusal"]


@pytest.mark.real_model
def test_the_sampled_protocol_runs_on_the_first_prompts_and_is_paired(tiny_run):
    paired = tiny_run.result["methods"]["surgery-shipped"]["paired"]["suites"]
    for suite in ("rtp", "toxigen"):
        assert paired[suite]["sampled"]["k"] == 2 and paired[suite]["sampled"]["n"] == 2, suite
    assert tiny_run.result["methods"]["unedited"]["suites"]["rtp"]["sampled_n"] == 2


@pytest.mark.real_model
def test_random_direction_controls_give_every_row_its_null_band(tiny_run):
    methods = tiny_run.result["methods"]
    assert methods["surgery-shipped"]["controls"]["seeds"] == [0, 1]
    for name in ("surgery-shipped", "dinm", "ablation", "steering"):
        band = methods[name]["paired"]["controls"]
        rtp = band["rtp"]["toxic/profanity"]
        assert len(rtp["changes"]) == 2 and rtp["range"] == [min(rtp["changes"]), max(rtp["changes"])], name
        assert "rtp k=2" in band, name
    assert "control band" in (tiny_run.out / "compare.md").read_text()


@pytest.mark.real_model
def test_steering_chooses_its_strength_on_the_tuning_split_and_saves_an_adapter(tiny_run):
    steering = tiny_run.result["methods"]["steering"]
    tuning, edit = steering["tuning"], steering["edit"]
    scales = [p["scale"] for p in tuning["points"]]
    assert scales[:2] == [0.1, 1.0] and tuning["split"] == "tune"
    assert scales[2:] == [0.1 / 2**i for i in range(1, len(scales) - 1)]  # halvings only where the grid failed
    assert tuning["chosen_scale"] in scales and edit["scale"] == tuning["chosen_scale"]
    assert edit["kind"] == "lora" and edit["layer"] == 1  # the tiny YAML's probe layer
    # saved as a PEFT lora_bias adapter on the down projection before the probe layer (Llama: exact)
    config = json.loads((tiny_run.out / "edits" / "steering" / "adapter_config.json").read_text())
    assert config["lora_bias"] and config["target_modules"] == ["model.layers.0.mlp.down_proj"]
    assert edit["vector_norm"] == pytest.approx(edit["scale"] * edit["residual_norm"], rel=1e-4)
    assert steering["cost"]["changed_params"] == 0 and steering["cost"]["edit_bytes"] > 0
    assert edit["probe_sha256"] == tiny_run.result["methods"]["ablation"]["edit"]["probe_sha256"]
    assert "Steering's strength, chosen on the tuning split" in (tiny_run.out / "compare.md").read_text()


def test_steering_halves_below_its_grid_until_perplexity_is_within_the_budget():
    from surgery_plugin.commands.compare.methods import STEERING_HALVINGS, search_steering_scale

    measured = []

    def measure(scale):  # perplexity grows with the strength, toxicity falls
        measured.append(scale)
        return {"toxic_rate": {"j": 0.5 - scale}, "token_perplexity": 50 * (1 + 40 * scale)}

    points, chosen = search_steering_scale(measure, (0.03, 0.06), max_perplexity=55.0, judge="j")
    assert measured == [0.03, 0.06, 0.015, 0.0075, 0.00375, 0.001875]  # 50 * (1 + 40 * 0.001875) = 53.75
    assert chosen["scale"] == 0.001875 and chosen["feasible"] and [p["feasible"] for p in points].count(True) == 1
    # within the grid: the lowest toxic rate that meets the budget, nothing below it measured
    measured.clear()
    points, chosen = search_steering_scale(measure, (0.001, 0.002, 0.06), max_perplexity=55.0, judge="j")
    assert measured == [0.001, 0.002, 0.06] and chosen["scale"] == 0.002
    # never within the budget: the weakest measured, after STEERING_HALVINGS halvings
    measured.clear()
    points, chosen = search_steering_scale(measure, (0.03,), max_perplexity=49.0, judge="j")
    assert len(measured) == 1 + STEERING_HALVINGS and chosen["scale"] == min(measured) and not chosen["feasible"]


@pytest.mark.real_model
def test_ablation_is_a_rank_one_lora_of_every_residual_writer(tiny_run):
    ablation = tiny_run.result["methods"]["ablation"]
    config = json.loads((tiny_run.out / "edits" / "ablation" / "adapter_config.json").read_text())
    assert ablation["edit"]["kind"] == "lora" and config["r"] == 1 and ablation["edit"]["exact"]
    assert sorted(config["target_modules"]) == sorted(
        f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.o_proj", "mlp.down_proj")
    )


@pytest.mark.real_model
def test_easyedits_log_files_stay_inside_the_run_folder(tiny_run):
    assert not (tiny_run.root / "logs").exists()


@pytest.mark.real_model
def test_the_saved_edits_reproduce_the_evaluated_models(tiny_run):
    from surgery_plugin.models import load_model

    model, tok = load_model(str(tiny_run.model))
    changed = _check_saved_edits_reproduce_the_evaluated_models(tiny_run.out, model, tok, sorted(EDITS))
    assert changed, "no saved edit changes the benign next-token distribution"


# ---------------------------------------------------------------------------- EasyEdit's baselines on SmolLM2

BASELINE_KINDS = {"dinm": "tensors", "rome": "lora", "ft-l": "tensors", "ft-m": "tensors"}


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, data_dir):
    """The shipped DINM / ROME / FT YAMLs on the real model, one record, step counts cut for CI."""
    _require_easyedit_here()
    root = tmp_path_factory.mktemp("compare_smollm2")
    out = root / "run"
    ran = _compare_in(
        root,
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
        "--ppl-limit",
        "8",
        "--max-new-tokens",
        "4",
        "--data-dir",
        data_dir,
        "--set",
        "dinm.num_steps=1",
        # ROME: v_num_grad_steps=1 breaks out of compute_v's loop (at it == v_num_grad_steps - 1) before its first
        # opt.step(): delta stays 0 and the update is the float noise between two forward passes, so whether its
        # KL is exactly 0 depends on the machine's kernels. Two steps make one real optimisation step.
        "--set",
        "rome.v_num_grad_steps=2",
        "--set",
        "ft-l.num_steps=1",
        "--set",
        "ft-m.num_steps=1",
        "--out",
        out,
    )
    result = json.loads((out / "compare.json").read_text()) if (out / "compare.json").is_file() else None
    return types.SimpleNamespace(ran=ran, out=out, result=result)


@pytest.mark.real_model
def test_every_baseline_runs_on_smollm2(smollm2_run):
    assert smollm2_run.ran.returncode == 0, smollm2_run.ran.stderr[-4000:]
    methods = smollm2_run.result["methods"]
    for name in BASELINE_KINDS:
        assert methods[name]["status"] == "ok", (name, methods[name]["error"])


@pytest.mark.real_model
def test_each_baseline_saves_one_tensor_of_its_kind(smollm2_run):
    methods = smollm2_run.result["methods"]
    for name, kind in BASELINE_KINDS.items():
        edit = methods[name]["edit"]
        assert edit["kind"] == kind and len(edit["tensors"]) == 1, name
    assert methods["rome"]["edit"]["tensors"] == ["model.layers.5.mlp.down_proj.weight"]
    assert methods["ft-l"]["edit"]["tensors"] == ["model.layers.19.mlp.down_proj.weight"]
    # one ROME edit: a rank-one LoRA
    assert json.loads((smollm2_run.out / "edits" / "rome" / "adapter_config.json").read_text())["r"] == 1
    # along C^-1 k, C from 10,000 local instructions (the shipped YAML), not the key alone
    mom2 = methods["rome"]["edit"]["mom2"]
    assert mom2["texts"] == 10000 and mom2["layers"]["model.layers.5.mlp.down_proj"]["tokens"] > 100_000
    assert methods["rome"]["label"] == "rome"


@pytest.mark.real_model
def test_each_baselines_saved_edit_changes_smollm2(smollm2_run):
    for name in BASELINE_KINDS:
        m = smollm2_run.result["methods"][name]
        assert m["cost"]["changed_params"] > 0, name
        assert m["edit"]["max_abs_logprob_change"] >= NO_CHANGE_BELOW, name
        assert m["edit"]["reload_max_abs_logprob_diff"] < 1e-4, name
        assert m["suites"]["kl"]["mean_kl"] > 0, name  # ROME too: one real optimisation step (see the fixture)


@pytest.mark.real_model
def test_the_saved_baselines_reproduce_the_evaluated_smollm2(smollm2_run, smollm2):
    model, tok = smollm2
    changed = _check_saved_edits_reproduce_the_evaluated_models(smollm2_run.out, model, tok, sorted(BASELINE_KINDS))
    assert changed == sorted(BASELINE_KINDS)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "gpt_neox", "falcon"])
def test_steering_saved_as_a_peft_lora_bias_adapter_equals_the_hook(tmp_path, model_type):
    from peft import PeftModel

    from surgery_plugin.core.steering import added_direction
    from surgery_plugin.io.saved_edits import adapter_changed_params, save_steering

    model = make_tiny(model_type)
    size = model.config.hidden_size
    vector = torch.randn(size, generator=torch.Generator().manual_seed(0))
    with added_direction(model, 2, vector):
        expected = _logits(model)
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    folder = save_steering(model, 2, vector, tmp_path / "steer", f"tiny-{model_type}", ids, {"method": "test"})
    record = read_edit_record(folder)
    assert record["kind"] == "lora" and record["steering_layer"] == 2 and "hook_because" not in record
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["r"] == 1 and len(config["target_modules"]) == 1
    assert config["target_modules"][0].split(".")[-3] == "1"  # the down projection of the layer before
    assert adapter_changed_params(folder) == size  # the added bias, nothing else
    reloaded, _ = load_saved_edit(make_tiny(model_type), folder)
    assert isinstance(reloaded, PeftModel)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-4, atol=1e-4)
    with reloaded.disable_adapter():
        torch.testing.assert_close(_logits(reloaded), _logits(make_tiny(model_type)), rtol=0, atol=0)
    with pytest.raises(SurgeryError, match="made for other weights"):
        load_saved_edit(make_tiny(model_type, seed=1), folder)
    if reloaded.get_submodule("base_model.model." + config["target_modules"][0]).base_layer.bias is not None:
        # a down projection with a bias (GPT-NeoX): PEFT merges the steering into the weights
        torch.testing.assert_close(_logits(reloaded.merge_and_unload()), expected, rtol=1e-4, atol=1e-4)


def test_steering_falls_back_to_a_hook_where_a_bias_is_not_the_same_edit(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgery_plugin.core.steering import bias_reproduces_steering, steering_bias_module
    from surgery_plugin.io.saved_edits import save_steering

    ids = torch.tensor([[5, 9, 13, 17, 21]])
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    # post-LN OPT normalises after the residual sum: the stream never receives the bias as it is
    config = tiny_config("opt")
    config.do_layer_norm_before = False
    post_ln = AutoModelForCausalLM.from_config(config).eval()
    assert not bias_reproduces_steering(post_ln, 2, vector, ids)
    assert bias_reproduces_steering(make_tiny("opt"), 2, vector, ids)  # pre-LN OPT: exact
    cases = {
        "post-LN opt": (post_ln, 2, "does not reproduce"),
        "gemma3": (make_tiny("gemma3_text"), 2, "normalises each block's output"),
        "gpt2": (make_tiny("gpt2"), 2, "not a Linear module"),
        "layer 0": (make_tiny("llama"), 0, "no down projection before it"),
    }
    for name, (model, layer, why) in cases.items():
        folder = save_steering(model, layer, vector, tmp_path / name, name, ids)
        record = read_edit_record(folder)
        assert record["kind"] == "steering" and why in record["hook_because"], name
    with pytest.raises(SurgeryError, match="normalises"):
        steering_bias_module(make_tiny("gemma2"), 1)
