"""Behaviors (toxicity, jailbreak, attitude) declared once, their suites and judges, and stacks of several edits."""

from __future__ import annotations

import pytest
import torch
from helpers import CharTokenizer, assert_one_line_error, make_tiny, run_cli

from surgery_plugin import SurgeryHyperParams, apply_edit
from surgery_plugin.behaviors import BEHAVIORS, check_behavior, get_behavior, hparams_for
from surgery_plugin.errors import SurgeryError
from surgery_plugin.evaluation.judges import JUDGES, load_judge
from surgery_plugin.evaluation.protocols import PROTOCOLS, settings_for
from surgery_plugin.evaluation.runner import evaluate_plan
from surgery_plugin.io.stack import export_stack, load_stack
from surgery_plugin.pipeline import build_probe, build_stack

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 60, 12, 7, 3]])


# ---------------------------------------------------------------------------- the registry


def test_the_three_behaviors():
    assert set(BEHAVIORS) == {"toxicity", "jailbreak", "attitude"}


@pytest.mark.parametrize("name", sorted(BEHAVIORS))
def test_a_behavior_names_real_suites_with_the_capability_costs(name):
    spec = BEHAVIORS[name]
    assert set(spec.suites) <= set(PROTOCOLS) and {"ppl", "kl"} <= set(spec.suites)
    assert set(spec.tune_suites) <= set(spec.suites)


@pytest.mark.parametrize("name", sorted(BEHAVIORS))
def test_a_behaviors_metric_is_a_headline_of_one_of_its_suites(name):
    suite, key = BEHAVIORS[name].metric
    assert suite in BEHAVIORS[name].suites and PROTOCOLS[suite].metric(key).headline


@pytest.mark.parametrize("name", sorted(BEHAVIORS))
def test_a_behaviors_judges_and_probe_data_exist(name):
    spec = BEHAVIORS[name]
    assert {j.split(":")[0] for j in spec.judges.split(",")} <= set(JUDGES)
    assert spec.probe_data in spec.probe_data_choices


def test_unknown_behavior_lists_the_known_ones():
    with pytest.raises(SurgeryError, match="unknown behavior 'kindness'; known: toxicity, jailbreak, attitude"):
        get_behavior("kindness")


def test_shipped_yaml_names():
    assert hparams_for("smollm2-135m", "toxicity").name == "smollm2-135m.yaml"
    assert hparams_for("/models/smollm2-135m", "jailbreak").name == "smollm2-135m-jailbreak.yaml"
    with pytest.raises(SurgeryError, match="unknown behavior"):
        hparams_for("smollm2-135m", "kindness")


def test_check_behavior_accepts_hparams_made_for_it():
    assert check_behavior(SurgeryHyperParams(behavior="attitude"), "attitude") is BEHAVIORS["attitude"]


def test_check_behavior_refuses_a_yaml_of_another_behavior():
    with pytest.raises(SurgeryError) as err:
        check_behavior(SurgeryHyperParams(behavior="toxicity"), "jailbreak", "tox.yaml")
    assert str(err.value).startswith("tox.yaml are for behavior 'toxicity', not 'jailbreak'; pass --behavior toxicity")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- judges and suites


def test_vader_scores_negative_text_negative():
    negative, positive = load_judge("vader").score(["this is a terrible, boring film", "a wonderful, moving film"])
    assert negative > 0.5 > positive


@pytest.fixture(scope="module")
def refusal_judge(data_dir):
    return load_judge("refusal", data_dir=data_dir, progress=False)


def test_refusal_judge_tells_compliance_from_refusal(refusal_judge):
    complied, refused = refusal_judge.score(
        ["Sure, here are the steps: first buy the chemicals.", "I'm sorry, but I can't help with that request."]
    )
    assert complied > 0.5 > refused


def test_refusal_judge_is_checked_on_safeedit(refusal_judge):
    check = refusal_judge.info()
    assert check["safeedit_auc"] > 0.8 and check["safeedit_n"] == 186, check


def test_sst2_judge_scores_negative_reviews_negative(data_dir):
    sst2 = load_judge("minilm:sst2", data_dir=data_dir, progress=False)
    bad, good = sst2.score(["a dull, lifeless and painful movie", "a joyous, brilliant triumph"])
    assert bad > 0.5 > good and sst2.info()["test_auc"] > 0.8


@pytest.fixture(scope="module")
def tiny_suites(data_dir, refusal_judge):
    """attitude and false_refusal on a tiny model: 4 report-split prompts each, 4 new tokens."""
    judges = [load_judge("vader"), refusal_judge]
    plan = {
        suite: settings_for(suite, "report", judges, data_dir, limit=4, max_new_tokens=4, progress=False)
        for suite in ("attitude", "false_refusal")
    }
    results, rows = evaluate_plan(make_tiny("llama"), CharTokenizer(), plan)
    return plan, results["suites"], rows


def test_attitude_suite_judges_the_report_openings(tiny_suites):
    plan, suites, _ = tiny_suites
    attitude = suites["attitude"]
    assert attitude["n"] == 4 and set(attitude["by_judge"]) == {"vader", "refusal"}
    start = plan["attitude"].start
    assert attitude["prompts"] == f"openings of negative sst2 dev reviews[{start}:{start + 4}]"


def test_attitude_positive_rate_counts_the_judged_rows(tiny_suites):
    _, suites, rows = tiny_suites
    vader = [r["scores"]["vader"] for r in rows if r["suite"] == "attitude"]
    assert len(vader) == 4
    assert suites["attitude"]["positive_rate"] == sum(s < 0.5 for s in vader) / 4
    assert suites["attitude"]["by_judge"]["vader"]["mean_negativity"] == pytest.approx(sum(vader) / 4)


def test_false_refusal_is_judged_only_by_refusal_type_judges(tiny_suites):
    _, suites, _ = tiny_suites
    assert set(suites["false_refusal"]["by_judge"]) == {"refusal"}
    assert suites["false_refusal"]["n"] == 4


def test_false_refusal_rates_count_the_refused_rows(tiny_suites):
    _, suites, rows = tiny_suites
    mine = [r for r in rows if r["suite"] == "false_refusal"]
    assert len(mine) == 4
    assert suites["false_refusal"]["false_refusal_rate"] == sum(r["refused"] for r in mine) / 4
    judged = sum(r["scores"]["refusal"] < 0.5 for r in mine) / 4
    assert suites["false_refusal"]["by_judge"]["refusal"]["judged_refusal_rate"] == judged


def test_suite_rows_name_their_suite(tiny_suites):
    assert {r["suite"] for r in tiny_suites[2]} == {"attitude", "false_refusal"}


# ---------------------------------------------------------------------------- stacks


def _probe_csv(folder, name, bad_word):
    rows = [(f"have a lovely day number {i}", 0) for i in range(20)] + [
        (f"you {bad_word} number {i}", 1) for i in range(20)
    ]
    path = folder / f"{name}.csv"
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return str(path)


COMMON = dict(
    probe_max_per_class=None, probe_epochs=3, probe_layer=2, top_k=12, alpha=0.8, normalize=True, max_length=48
)


def _steps(folder):
    return [
        ("toxicity", SurgeryHyperParams(probe_data=_probe_csv(folder, "a", "idiot"), **COMMON)),
        (
            "attitude",
            SurgeryHyperParams(probe_data=_probe_csv(folder, "b", "boring film"), behavior="attitude", **COMMON),
        ),
    ]


@pytest.fixture(scope="module", params=[False, True], ids=["independent", "sequential"])
def stack(request, tmp_path_factory):
    """A two-step stack of a tiny llama, built and exported; and whether the model was restored."""
    folder = tmp_path_factory.mktemp("stack")
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = build_stack(model, CharTokenizer(), _steps(folder), sequential=request.param, progress=False)
    restored = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = export_stack(steps, model, folder / "stack", base_model_name="tiny-llama", sequential=request.param)
    return request.param, steps, out, restored


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_build_stack_restores_the_model(stack):
    assert stack[3], "build_stack restores the model"


def test_a_sequential_steps_probe_is_trained_on_the_edited_weights(stack):
    sequential, steps, _, _ = stack
    first, second = (step.probe.metadata["gate_fingerprint"] for step in steps)
    assert (first != second) == sequential


def test_a_stack_loads_as_the_sum_of_its_edits(stack):
    _, steps, out, _ = stack
    reference = make_tiny("llama")
    for step in steps:
        apply_edit(reference, step.edit)
    assert (_logits(load_stack(make_tiny("llama"), out)) - _logits(reference)).abs().max() <= 1e-5


def test_a_stack_is_evaluated_paired_against_the_unedited_model(stack, tmp_path, data_dir):
    import json

    from surgery_plugin.commands.evaluate import eval_plan, evaluate_controls, run_eval
    from surgery_plugin.evaluation.judges import load_judges

    _, _, out, _ = stack
    model = load_stack(make_tiny("llama"), out)
    settings = eval_plan(
        ["rtp"], load_judges("profanity"), data_dir, limit=3, start=0, max_new_tokens=3, progress=False
    )
    run_eval(model, CharTokenizer(), settings, tmp_path / "run", {"adapter": str(out)}, paired=True)
    paired = json.loads((tmp_path / "run" / "paired.json").read_text())
    assert paired["suites"]["rtp"]["outcomes"]["toxic/profanity"]["n"] == 3
    with pytest.raises(SurgeryError, match="a stack has several"):
        evaluate_controls(model, CharTokenizer(), settings, out, 1)


def test_a_stack_loads_some_of_its_edits_by_name(stack):
    _, steps, out, _ = stack
    one = make_tiny("llama")
    apply_edit(one, steps[0].edit)
    only_first = load_stack(make_tiny("llama"), out, names=["toxicity"])
    assert (_logits(only_first) - _logits(one)).abs().max() <= 1e-5


def test_a_stack_refuses_other_weights(stack):
    with pytest.raises(SurgeryError, match="was made for 'tiny-llama'|made on other weights"):
        load_stack(make_tiny("llama", seed=9), stack[2])


def test_a_stack_refuses_an_unknown_name(stack):
    with pytest.raises(SurgeryError, match="has no adapter"):
        load_stack(make_tiny("llama"), stack[2], names=["nope"])


def test_a_stack_names_each_behavior_once(tmp_path):
    steps = _steps(tmp_path)
    with pytest.raises(SurgeryError, match="a stack names each behavior once"):
        build_stack(make_tiny("llama"), CharTokenizer(), [steps[0], steps[0]], sequential=False, progress=False)


@pytest.fixture
def stale_probe_steps(tmp_path):
    """Steps whose second probe was trained on the *unedited* model."""
    model, tok = make_tiny("llama"), CharTokenizer()
    steps = _steps(tmp_path)
    stale, _ = build_probe(model, tok, steps[1][1], progress=False)
    path = stale.save(tmp_path / "stale.safetensors")
    steps[1] = ("attitude", steps[1][1].replace(probe_path=str(path)))
    return model, tok, steps


def test_a_sequential_step_refuses_a_probe_trained_on_another_model(stale_probe_steps):
    model, tok, steps = stale_probe_steps
    with pytest.raises(SurgeryError, match="probe of 'attitude' was trained on another model"):
        build_stack(model, tok, steps, sequential=True, progress=False)


def test_an_independent_step_takes_a_probe_trained_on_the_base_model(stale_probe_steps):
    model, tok, steps = stale_probe_steps
    built = build_stack(model, tok, steps, sequential=False, progress=False)
    assert [step.name for step in built] == ["toxicity", "attitude"]
    assert built[1].probe.metadata["gate_fingerprint"] == built[0].probe.metadata["gate_fingerprint"]


# ---------------------------------------------------------------------------- the CLI


def test_cli_unknown_behavior_is_one_line(tmp_path):
    assert_one_line_error(
        run_cli("probe", "--behavior", "kindness", "--out", tmp_path / "p"), "unknown behavior 'kindness'"
    )
    assert not (tmp_path / "p").exists()


def test_cli_behavior_without_a_shipped_yaml_is_one_line(tmp_path, tiny_model_dir):
    result = run_cli(
        "edit", "--model", tiny_model_dir, "--behavior", "attitude", "--probe", tmp_path / "p", "--out", tmp_path / "a"
    )
    assert_one_line_error(result, "no shipped hparams/Surgery/tiny-llama-attitude.yaml")
    assert not (tmp_path / "a").exists()


def test_cli_stack_of_one_behavior_is_one_line(tmp_path, tiny_model_dir):
    result = run_cli("stack", "--model", tiny_model_dir, "--behaviors", "toxicity", "--out", tmp_path / "s")
    assert_one_line_error(result, "--behaviors takes two or more")
    assert not (tmp_path / "s").exists()


def test_cli_hparams_of_another_behavior_are_refused_in_one_line(tmp_path, tiny_model_dir):
    hparams = tmp_path / "tox.yaml"
    hparams.write_text("alg_name: Surgery\nbehavior: toxicity\ntop_k: 10\n")
    result = run_cli(
        "edit",
        "--model",
        tiny_model_dir,
        "--behavior",
        "attitude",
        "--hparams",
        hparams,
        "--probe",
        tmp_path / "p",
        "--out",
        tmp_path / "a",
    )
    assert_one_line_error(result, f"{hparams} are for behavior 'toxicity', not 'attitude'")
    assert not (tmp_path / "a").exists()
