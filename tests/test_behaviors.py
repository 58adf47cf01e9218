"""Behaviors (toxicity, jailbreak, attitude) declared once, their suites and judges, and stacks of several edits."""

from __future__ import annotations

import pytest
import torch
from helpers import CharTokenizer, assert_one_line_error, make_tiny, surgery

from surgery_plugin import SurgeryHyperParams, apply_edit
from surgery_plugin.behaviors import BEHAVIORS
from surgery_plugin.behaviors import get_behavior as behavior
from surgery_plugin.core import architectures
from surgery_plugin.errors import SurgeryError
from surgery_plugin.evaluation.judges import load_judge, load_judges
from surgery_plugin.evaluation.protocols import PROTOCOLS
from surgery_plugin.evaluation.runner import evaluate
from surgery_plugin.evaluation.suites import EvalSettings
from surgery_plugin.io.stack import export_stack, load_stack
from surgery_plugin.pipeline import build_stack

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 60, 12, 7, 3]])


def test_every_behavior_names_real_suites_judges_and_a_metric():
    assert set(BEHAVIORS) == {"toxicity", "jailbreak", "attitude"}
    for spec in BEHAVIORS.values():
        assert set(spec.suites) <= set(PROTOCOLS) and {"ppl", "kl"} <= set(spec.suites), spec.name
        suite, key = spec.metric
        assert suite in spec.suites and PROTOCOLS[suite].metric(key).headline
        assert set(spec.report) <= set(spec.suites)
    with pytest.raises(SurgeryError, match="unknown behavior 'kindness'; known: toxicity, jailbreak, attitude"):
        behavior("kindness")


def test_sentiment_and_refusal_judges_score_what_they_say(data_dir):
    vader = load_judge("vader")
    negative, positive = vader.score(["this is a terrible, boring film", "a wonderful, moving film"])
    assert negative > 0.5 > positive
    refusal = load_judge("refusal", data_dir=data_dir, progress=False)
    complied, refused = refusal.score(
        ["Sure, here are the steps: first buy the chemicals.", "I'm sorry, but I can't help with that request."]
    )
    assert complied > 0.5 > refused
    check = refusal.info()
    assert check["safeedit_auc"] > 0.8 and check["safeedit_n"] == 186, check
    sst2 = load_judge("minilm:sst2", data_dir=data_dir, progress=False)
    bad, good = sst2.score(["a dull, lifeless and painful movie", "a joyous, brilliant triumph"])
    assert bad > 0.5 > good and sst2.info()["test_auc"] > 0.8


def test_attitude_and_false_refusal_suites_on_a_tiny_model(data_dir):
    model, tok = make_tiny("llama"), CharTokenizer()
    judges = load_judges("vader,refusal", data_dir=data_dir, progress=False)
    settings = EvalSettings(judges=judges, limit=4, data_dir=data_dir, max_new_tokens=4, progress=False)
    results, rows = evaluate(model, tok, ["attitude", "false_refusal"], settings)
    attitude, false_refusal = results["suites"]["attitude"], results["suites"]["false_refusal"]
    assert attitude["n"] == 4 and set(attitude["by_judge"]) == {"vader", "refusal"}
    assert 0 <= attitude["by_judge"]["vader"]["positive_rate"] <= 1
    assert attitude["prompts"].startswith("openings of negative sst2 dev reviews[0:4]")
    assert set(false_refusal["by_judge"]) == {"refusal"}, "only refusal-type judges judge refusals"
    assert 0 <= false_refusal["false_refusal_rate"] <= 1 and false_refusal["n"] == 4
    assert {r["suite"] for r in rows} == {"attitude", "false_refusal"}


def _probe_csv(tmp_path, name, bad_word):
    rows = [(f"have a lovely day number {i}", 0) for i in range(20)] + [
        (f"you {bad_word} number {i}", 1) for i in range(20)
    ]
    path = tmp_path / f"{name}.csv"
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return str(path)


def _steps(tmp_path):
    common = dict(
        probe_max_per_class=None, probe_epochs=3, probe_layer=2, top_k=12, alpha=0.8, normalize=True, max_length=48
    )
    return [
        ("toxicity", SurgeryHyperParams(probe_data=_probe_csv(tmp_path, "a", "idiot"), **common)),
        ("attitude", SurgeryHyperParams(probe_data=_probe_csv(tmp_path, "b", "boring film"), **common)),
    ]


@pytest.mark.parametrize("sequential", [False, True])
def test_a_stack_loads_as_the_sum_of_its_edits(tmp_path, sequential):
    model, tok = make_tiny("llama"), CharTokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = build_stack(model, tok, _steps(tmp_path), sequential=sequential, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "build_stack restores the model"
    if sequential:  # the second probe saw the first edit: its rows were picked on the edited weights
        assert steps[1].probe.metadata["gate_fingerprint"] != steps[0].probe.metadata["gate_fingerprint"]
    out = export_stack(steps, model, tmp_path / "stack", base_model_name="tiny-llama", sequential=sequential)
    reference = make_tiny("llama")
    for step in steps:
        apply_edit(reference, step.edit)
    stacked = load_stack(make_tiny("llama"), out)
    with torch.no_grad():
        assert (stacked(IDS).logits - reference(IDS).logits).abs().max() <= 1e-5
    only_first = load_stack(make_tiny("llama"), out, names=["toxicity"])
    one = make_tiny("llama")
    apply_edit(one, steps[0].edit)
    with torch.no_grad():
        assert (only_first(IDS).logits - one(IDS).logits).abs().max() <= 1e-5
    with pytest.raises(SurgeryError, match="was made for 'tiny-llama'|made on other weights"):
        load_stack(make_tiny("llama", seed=9), out)
    with pytest.raises(SurgeryError, match="has no adapter"):
        load_stack(make_tiny("llama"), out, names=["nope"])


def test_a_sequential_step_refuses_a_probe_trained_on_another_model(tmp_path):
    from surgery_plugin.data.probe_data import load_behavior_data
    from surgery_plugin.pipeline import make_probe

    model, tok = make_tiny("llama"), CharTokenizer()
    steps = _steps(tmp_path)
    data = load_behavior_data(steps[1][1].probe_data)
    stale, _ = make_probe(model, tok, data, layer=2, progress=False)  # trained on the *unedited* model
    path = stale.save(tmp_path / "stale.safetensors")
    steps[1] = ("attitude", steps[1][1].replace(probe_path=str(path)))
    with pytest.raises(SurgeryError, match="probe of 'attitude' was trained on another model"):
        build_stack(model, tok, steps, sequential=True, progress=False)
    built = build_stack(model, tok, steps, sequential=False, progress=False)  # independent: the same probe is right
    assert len(built) == 2 and architectures.model_name(model) == "tiny-llama"


def test_cli_behavior_errors_are_one_line(tmp_path, tiny_model_dir):
    assert_one_line_error(
        surgery("probe", "--behavior", "kindness", "--out", tmp_path / "p"), "unknown behavior 'kindness'"
    )
    result = surgery(
        "edit", "--model", tiny_model_dir, "--behavior", "attitude", "--probe", tmp_path / "p", "--out", tmp_path / "a"
    )
    assert_one_line_error(result, "no shipped hparams/Surgery/tiny-llama-attitude.yaml")
    result = surgery("stack", "--model", tiny_model_dir, "--behaviors", "toxicity", "--out", tmp_path / "s")
    assert_one_line_error(result, "--behaviors takes two or more")
    assert not any((tmp_path / n).exists() for n in ("p", "a", "s"))
