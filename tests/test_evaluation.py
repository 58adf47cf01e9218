"""Evaluation suites, metrics, run files and `surgery eval` errors; tiny models for wiring, SmolLM2 for protocols."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import CharTokenizer, assert_one_line_error, bert_tokenizer, make_tiny, surgery, tiny_bert

from surgery_plugin.core.statistics import wilson_interval
from surgery_plugin.errors import SurgeryError
from surgery_plugin.evaluation.generation import _StopAtNewline, generate_continuations
from surgery_plugin.evaluation.judges import load_judge, load_judges
from surgery_plugin.evaluation.metrics import is_refusal, n_gram_entropy, rate_summary, toxicity_summary
from surgery_plugin.evaluation.protocols import toxigen_documents
from surgery_plugin.evaluation.runner import evaluate, parse_suites, write_run
from surgery_plugin.evaluation.suites import (
    EvalSettings,
    _expected_max_toxicity,
    run_advbench,
    run_rtp,
    run_safeedit,
    run_toxigen,
)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama"), CharTokenizer()


@pytest.fixture(scope="module")
def two_judges(tmp_path_factory):
    """profanity + a (random, tiny) hf classifier: two independent judges without downloads."""
    folder = tmp_path_factory.mktemp("judge") / "tiny-tox"
    tiny_bert(2, id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1}).save_pretrained(folder)
    bert_tokenizer().save_pretrained(folder)
    return load_judges(f"profanity,hf:{folder}", progress=False), folder


# ---------------------------------------------------------------- metrics


def test_rates_exclude_and_count_missing_scores():
    summary = toxicity_summary([0.9, 0.1, float("nan"), 0.5])
    assert summary["toxic_rate"] == pytest.approx(2 / 3) and summary["n_scored"] == 3 and summary["n_missing"] == 1
    assert summary["mean_toxicity"] == pytest.approx(0.5)
    assert toxicity_summary([float("nan")])["toxic_rate"] is None
    low, high = wilson_interval(2, 3)
    assert summary["toxic_rate_ci95"] == [low, high] and 0 < low < 2 / 3 < high < 1
    assert rate_summary([True, None, False], key="x") == {
        "x": 0.5,
        "x_ci95": list(wilson_interval(1, 2)),
        "n_scored": 2,
        "n_missing": 1,
    }


def test_expected_max_toxicity_is_mean_of_per_prompt_maxima():
    samples = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    nan = float("nan")
    scores = {"j": [0.1, 0.7, 0.2, 0.3, 0.4, nan, nan, nan, nan]}
    out = _expected_max_toxicity(samples, scores, 3, 0.5)["j"]
    assert out["expected_max_toxicity"] == pytest.approx((0.7 + 0.4) / 2)  # the all-missing prompt is missing, not 0
    assert (
        out["toxicity_probability"] == pytest.approx(0.5) and out["n_missing"] == 1 and out["n_missing_samples"] == 4
    )


def test_refusal_strings_and_fluency():
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("I\u2019m sorry, no.")
    assert is_refusal("Doing that is illegal.")
    assert not is_refusal("Sure, here is a script that exploits the bug:")
    assert n_gram_entropy("the the the the the") == pytest.approx(0.0)
    varied = n_gram_entropy("the quick brown fox jumps over the lazy dog near the river bank")
    assert varied > n_gram_entropy("go go go go go go stop go go go go go go") > 0


def test_stop_at_newline_marks_only_rows_that_produced_one():
    criterion = _StopAtNewline(torch.tensor([7]), prompt_width=2)
    ids = torch.tensor([[1, 7, 3, 4], [1, 2, 7, 4], [1, 2, 3, 4]])
    assert criterion(ids, None).tolist() == [False, True, False], "newlines inside the prompt do not count"


# ---------------------------------------------------------------- generation


def test_sampling_is_seeded_and_returns_k_per_prompt(tiny):
    model, tok = tiny
    prompts = ["hello there", "a much longer prompt about things", "x"]
    kwargs = dict(max_new_tokens=6, batch_size=4, progress=False, num_samples=3)
    first = generate_continuations(model, tok, prompts, seed=1, **kwargs)
    assert [len(s) for s in first] == [3, 3, 3]
    state = torch.random.get_rng_state()
    assert generate_continuations(model, tok, prompts, seed=1, **kwargs) == first
    assert torch.equal(torch.random.get_rng_state(), state), "the caller's random stream is left alone"
    assert generate_continuations(model, tok, prompts, seed=2, **kwargs) != first
    greedy = generate_continuations(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    assert greedy == generate_continuations(model, tok, prompts, max_new_tokens=6, batch_size=1, progress=False)


# ---------------------------------------------------------------- suites on a tiny model (wiring; the texts are noise)


def test_toxigen_covers_groups_round_robin_and_reports_each(tiny, two_judges, data_dir):
    model, tok = tiny
    judges, _ = two_judges
    docs = toxigen_documents(data_dir, start=5, limit=26)
    assert len({d["group"] for d in docs}) == 13 and all(d["prompt"].endswith("-") for d in docs)
    summary, rows = run_toxigen(
        model, tok, EvalSettings(judges=judges, limit=26, start=5, data_dir=data_dir, max_new_tokens=4, progress=False)
    )
    assert summary["n"] == 26 and summary["judges"] == [j.name for j in judges] and summary["judge"] == "profanity"
    for name in summary["judges"]:
        groups = summary["by_judge"][name]["by_group"]
        assert len(groups) == 13 and all(g["n"] == 2 for g in groups.values())
        rate = sum(g["toxic_rate"] * 2 for g in groups.values()) / 26
        assert summary["by_judge"][name]["toxic_rate"] == pytest.approx(rate)
    assert len(rows) == 26 and rows[0]["group"] and set(rows[0]["scores"]) == set(summary["judges"])


def test_rtp_keeps_old_keys_and_adds_expected_max_toxicity(tiny, data_dir):
    model, tok = tiny
    judge = load_judge("profanity", progress=False)
    summary, rows = run_rtp(
        model,
        tok,
        EvalSettings(judges=[judge], limit=4, data_dir=data_dir, samples=3, progress=False, max_new_tokens=5),
    )
    assert {
        "toxic_rate",
        "toxic_rate_ci95",
        "mean_toxicity",
        "n",
        "judge",
        "threshold",
        "prompts",
        "max_new_tokens",
        "decoding",
    } <= set(summary)
    assert summary["n"] == 4 and summary["judge"] == "profanity" and summary["sampling"]["k"] == 3
    sampled = [r for r in rows if r["decoding"] == "sample"]
    assert len(rows) == 4 + 12 and len(sampled) == 12
    maxima = {}
    for r in sampled:
        maxima[r["prompt"]] = max(maxima.get(r["prompt"], 0.0), r["scores"]["profanity"])
    assert summary["expected_max_toxicity"] == pytest.approx(sum(maxima.values()) / len(maxima))


def test_advbench_and_safeedit_on_a_model_without_chat_template(tiny, two_judges, data_dir):
    model, tok = tiny
    judges, _ = two_judges
    settings = EvalSettings(judges=judges, limit=3, data_dir=data_dir, max_new_tokens=4, progress=False)
    adv, rows = run_advbench(model, tok, settings)
    assert adv["n"] == 3 and adv["chat_template"] is False and 0 <= adv["refusal_rate"] <= 1
    assert adv["attack_success_rate"] == pytest.approx(1 - adv["refusal_rate"])
    assert [r["refused"] for r in rows] == [is_refusal(r["completion"]) for r in rows]
    settings.limit = 2
    safe, rows = run_safeedit(model, tok, settings)
    assert len(rows) == 10 and {r["metric"] for r in rows} == {
        "DS",
        "DG_onlyQ",
        "DG_otherA",
        "DG_otherQ",
        "DG_otherAQ",
    }
    for name in safe["judges"]:
        entry = safe["by_judge"][name]
        ds_rows = [r for r in rows if r["metric"] == "DS"]
        assert entry["DS"] == pytest.approx(sum(r["scores"][name] < 0.5 for r in ds_rows) / 2)
    assert safe["fluency"] >= 0 and safe["DS"] == safe["by_judge"]["profanity"]["DS"]
    with pytest.raises(SurgeryError, match="chat template"):
        run_advbench(
            model, tok, EvalSettings(judges=judges, limit=1, data_dir=data_dir, chat_template=True, progress=False)
        )


def test_suites_need_a_judge_and_a_valid_range(tiny, data_dir):
    model, tok = tiny
    with pytest.raises(SurgeryError, match="needs a judge"):
        run_rtp(model, tok, EvalSettings(limit=1, data_dir=data_dir))
    with pytest.raises(SurgeryError, match="no AdvBench instructions in range"):
        run_advbench(
            model, tok, EvalSettings(judges=[load_judge("profanity")], start=10_000, limit=1, data_dir=data_dir)
        )


def test_write_run_files_are_complete_and_json_safe(tiny, two_judges, data_dir, tmp_path):
    model, tok = tiny
    judges, _ = two_judges
    results, samples = evaluate(
        model,
        tok,
        "toxigen,advbench",
        EvalSettings(judges=judges, limit=13, data_dir=data_dir, max_new_tokens=3, progress=False),
    )
    results["suites"]["toxigen"]["by_judge"]["profanity"]["mean_toxicity"] = float(
        "nan"
    )  # a missing value must stay valid JSON
    run = write_run(tmp_path / "run", results, samples)
    loaded = json.loads((run / "results.json").read_text())
    assert loaded["schema_version"] == 2 and loaded["judges"] == [j.name for j in judges]
    assert set(loaded["judge_info"]) == set(loaded["judges"]) and loaded["judge_info"][judges[1].name]["label_mapping"]
    assert loaded["suites"]["toxigen"]["by_judge"]["profanity"]["mean_toxicity"] is None
    lines = (run / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 13 + 13 and all(json.loads(line)["scores"] for line in lines)
    report = (run / "report.md").read_text()
    assert (
        "| toxigen | toxic rate ↓ (n=13) |" in report
        and judges[1].name in report
        and "## ToxiGen hate prompts by target group" in report
    )
    assert (run / "toxigen_groups.png").stat().st_size > 1000 and (run / "judges.png").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "no temp files left behind"


def test_parse_suites_accepts_lm_eval_tasks_and_rejects_unknown():
    pytest.importorskip("lm_eval")
    assert parse_suites("rtp, surgery_ppl") == ["rtp", "surgery_ppl"]
    with pytest.raises(SurgeryError, match="unknown suite 'no_such_suite'.*lm-eval"):
        parse_suites("rtp,no_such_suite")
    with pytest.raises(SurgeryError, match="given twice"):
        parse_suites("rtp,rtp")


# ---------------------------------------------------------------- `surgery eval` bad input: one line, exit 2


def test_cli_eval_bad_input_is_one_line(tmp_path, data_dir):
    r = surgery("eval", "--suite", "nonsense", "--out", tmp_path / "a")
    assert_one_line_error(r, "unknown suite 'nonsense'")
    r = surgery("eval", "--suite", "rtp", "--judge", "profanity,bogus", "--out", tmp_path / "b")
    assert_one_line_error(r, "unknown judge 'bogus'", "available:")
    r = surgery(
        "eval", "--suite", "rtp", "--judge", "perspective", "--out", tmp_path / "c", env={"PERSPECTIVE_API_KEY": ""}
    )
    assert_one_line_error(r, "PERSPECTIVE_API_KEY")
    r = surgery("eval", "--suite", "rtp", "--judge", f"hf:{tmp_path / 'no-model'}", "--out", tmp_path / "d")
    assert_one_line_error(r, "could not load", "hf:/path/to/folder")
    empty = tmp_path / "data"
    (empty / "rtp").mkdir(parents=True)
    r = surgery(
        "eval",
        "--model",
        "smollm2-135m",
        "--suite",
        "advbench",
        "--limit",
        1,
        "--data-dir",
        empty,
        "--out",
        tmp_path / "e",
    )
    assert_one_line_error(r, "missing data file", "harmful_behaviors.csv")
    assert not (tmp_path / "e" / "results.json").exists()


# ---------------------------------------------------------------- SmolLM2 (real weights, chat template, lm-eval)


@pytest.mark.real_model
def test_cli_eval_all_generation_suites_with_two_judges(tmp_path, data_dir, two_judges):
    _, folder = two_judges
    run = tmp_path / "run"
    r = surgery(
        "eval",
        "--model",
        "smollm2-135m",
        "--suite",
        "rtp,toxigen,advbench,ppl",
        "--judge",
        f"profanity,hf:{folder}",
        "--limit",
        3,
        "--samples",
        2,
        "--max-new-tokens",
        12,
        "--ppl-limit",
        3,
        "--data-dir",
        data_dir,
        "--out",
        run,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["judges"] == ["profanity", f"hf:{folder}"]
    suites = results["suites"]
    assert (
        suites["rtp"]["n"] == 3
        and 0 <= suites["rtp"]["expected_max_toxicity"] <= 1
        and suites["rtp"]["sampling"]["k"] == 2
    )
    assert suites["toxigen"]["decoding"] == "greedy, stop at newline" and len(suites["toxigen"]["by_group"]) == 3
    assert suites["advbench"]["chat_template"] is True, (
        "SmolLM2-Instruct has a chat template: AdvBench goes in as a user turn"
    )
    assert suites["ppl"]["token_perplexity"] > 1
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == (3 + 3 * 2) + 3 + 3
    toxigen = [s for s in samples if s["suite"] == "toxigen"]
    assert all("\n" not in s["completion"] for s in toxigen) and any(s["completion"].strip() for s in toxigen)
    assert (run / "report.md").is_file() and (run / "toxigen_groups.png").is_file()


@pytest.mark.real_model
def test_safeedit_on_smollm2_uses_the_chat_template(smollm2, data_dir):
    model, tok = smollm2
    judge = load_judge("profanity", progress=False)
    summary, rows = run_safeedit(
        model, tok, EvalSettings(judges=[judge], limit=1, data_dir=data_dir, max_new_tokens=6, progress=False)
    )
    assert summary["chat_template"] is True and summary["n"] == 1 and len(rows) == 5
    assert all(summary[m] in (0.0, 1.0) for m in ("DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ"))
    # the DS response is what the model says to the templated adversarial prompt
    from surgery_plugin.evaluation.generation import format_prompts

    ds = next(r for r in rows if r["metric"] == "DS")
    texts, chat = format_prompts(tok, [ds["prompt"]])
    assert chat and texts[0].startswith("<|im_start|>system")
    direct = generate_continuations(model, tok, texts, 6, progress=False, add_special_tokens=False)
    assert direct[0] == ds["completion"]


@pytest.mark.real_model
def test_lm_eval_task_passes_through_and_unloadable_task_is_one_line(smollm2, data_dir):
    pytest.importorskip("lm_eval")
    model, tok = smollm2
    results, rows = evaluate(model, tok, ["surgery_ppl"], EvalSettings(limit=3, data_dir=data_dir, progress=False))
    metrics = results["suites"]["surgery_ppl"]["metrics"]
    assert metrics["word_perplexity,none"] > 1 and len(rows) == 3
    with pytest.raises(SurgeryError) as err:
        evaluate(model, tok, ["mmlu_abstract_algebra"], EvalSettings(limit=1, progress=False))
    assert "lm-eval could not run task 'mmlu_abstract_algebra'" in str(err.value) and "\n" not in str(err.value)
    assert not math.isnan(metrics["word_perplexity,none"])


def test_every_protocol_has_a_runner_and_reports_its_metrics(tiny, two_judges, data_dir):
    from surgery_plugin.evaluation.generation import next_token_logprobs
    from surgery_plugin.evaluation.protocols import PROTOCOLS, benign_documents
    from surgery_plugin.evaluation.report import metric_values
    from surgery_plugin.evaluation.suites import RUNNERS

    assert set(RUNNERS) == set(PROTOCOLS)
    model, tok = tiny
    judges, _ = two_judges
    settings = EvalSettings(judges=judges, limit=2, ppl_limit=3, data_dir=data_dir, max_new_tokens=3, progress=False)
    prompts = [d["prompt"] for d in benign_documents(data_dir, limit=3)]
    settings.kl_reference = next_token_logprobs(model, tok, prompts, progress=False)  # the model itself: KL 0
    results, _ = evaluate(model, tok, list(PROTOCOLS), settings)
    assert results["suites"]["kl"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    for name, protocol in PROTOCOLS.items():
        for metric in protocol.metrics:
            if metric.section is None:
                values = metric_values(results["suites"][name], metric)
                judged = [j for j in judges if protocol.judged_by in (None, getattr(j, "measures", None))]
                expected = {j.name for j in judged} if metric.per_judge else {"-"}
                assert set(values) == expected, (name, metric.key)
                if metric.ci:
                    assert all(ci is not None for _, ci in values.values()), (name, metric.key)
        assert any(m.headline for m in protocol.metrics), name


def test_kl_with_the_adapter_toggled_equals_kl_against_a_reference(data_dir, tmp_path):
    """Two routes to the same number: adapter off/on on the same batch, and an in-place edit against log-probs
    taken before the edit; alpha 0 is exactly no change."""
    from helpers import CharTokenizer, make_tiny

    from surgery_plugin import SurgeryHyperParams, apply_edit, execute_surgery, export_adapter, load_edited, set_alpha
    from surgery_plugin.core.probe import Probe
    from surgery_plugin.evaluation.generation import next_token_logprobs
    from surgery_plugin.evaluation.protocols import benign_documents

    model, tok = make_tiny("llama"), CharTokenizer()
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    edit = execute_surgery(model, Probe(torch.stack([-v, v]), torch.zeros(2)), SurgeryHyperParams(top_k=40, alpha=2.0))
    settings = EvalSettings(ppl_limit=5, data_dir=data_dir, progress=False)
    prompts = [d["prompt"] for d in benign_documents(data_dir, limit=5)]
    reference = next_token_logprobs(model, tok, prompts, progress=False)
    peft_model = load_edited(model, export_adapter(edit, model, tmp_path / "a", base_model_name="tiny-llama"))
    toggled, _ = evaluate(peft_model, tok, "kl", settings)
    assert toggled["suites"]["kl"]["mean_kl"] > 1e-4 and toggled["suites"]["kl"]["n"] == 5
    set_alpha(peft_model, 0.0)
    assert evaluate(peft_model, tok, "kl", settings)[0]["suites"]["kl"]["max_kl"] == 0.0
    in_place = make_tiny("llama")
    apply_edit(in_place, edit)
    settings.kl_reference = reference
    against_reference, rows = evaluate(in_place, tok, "kl", settings)
    assert against_reference["suites"]["kl"]["mean_kl"] == pytest.approx(toggled["suites"]["kl"]["mean_kl"], rel=1e-4)
    assert len(rows) == 5 and all(r["kl"] >= 0 for r in rows)
    with pytest.raises(SurgeryError, match="kl suite needs"):
        evaluate(make_tiny("llama"), tok, "kl", EvalSettings(ppl_limit=2, data_dir=data_dir, progress=False))
