"""`surgery tune` on a tiny model: the search runs, resumes, refuses other settings, validates, writes its files."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import CharTokenizer, make_tiny

from surgery_plugin import SurgeryHyperParams
from surgery_plugin.commands.tune.study import TuneSettings, check_space, tune
from surgery_plugin.errors import SurgeryError

SPACE = {
    "probe_layer": {"choices": [1, 2]},
    "pooling": {"choices": ["mean", "last"]},
    "probe_method": {"choices": ["linear", "mean_difference"]},
    "probe_project_out": {"choices": [None, "gate_benign_mean"]},
    "region_scoring": {"choices": ["cosine", "gate_contrast"]},
    "layer_start": {"low": 0.0, "high": 0.5},
    "top_k": {"low": 0.05, "high": 0.3},
    "normalize": {"choices": [True]},
    "alpha": {"low": 0.2, "high": 1.0},
}


def _settings(data_dir, **changes) -> TuneSettings:
    base = SurgeryHyperParams(
        probe_data="davidson",
        probe_max_per_class=20,
        max_length=32,
        feature_batch_size=8,
        probe_layer=2,  # the start point lies inside SPACE
        normalize=True,
        alpha=0.5,
        top_k=0.1,
    ).to_dict()
    values = dict(
        model="tiny-llama",
        base_hparams=base,
        space=SPACE,
        trials=3,
        limit=3,
        benign_limit=3,
        judges=("profanity",),
        max_ppl_increase=None,
        data_dir=str(data_dir),
        validation_limit=3,
    )
    return TuneSettings(**{**values, **changes})


def test_tune_searches_resumes_and_writes_the_chosen_point(tmp_path, data_dir):
    model, tok = make_tiny("llama"), CharTokenizer()
    out = tmp_path / "tune"
    result = tune(model, tok, _settings(data_dir), out, progress=False)
    assert (
        len(result["trials"]) == 3
        and result["front"]
        and result["chosen"]["trial"] in {t["number"] for t in result["trials"]}
    )
    first = min(result["trials"], key=lambda t: t["number"])["params"]  # the recipe the search starts from
    base = SurgeryHyperParams.from_dict(_settings(data_dir).base_hparams)
    assert (first["probe_layer"], first["pooling"], first["probe_project_out"], first["region_scoring"]) == (
        base.probe_layer,
        base.pooling,
        base.probe_project_out,
        base.region_scoring,
    )
    assert first["alpha"] == pytest.approx(base.alpha) and first["top_k"] == pytest.approx(base.top_k)
    for name in ("study.db", "front.json", "front.png", "chosen.yaml"):
        assert (out / name).is_file(), name
    chosen = SurgeryHyperParams.from_hparams(out / "chosen.yaml")
    params = next(t for t in result["trials"] if t["number"] == result["chosen"]["trial"])["params"]
    assert chosen.probe_layer == params["probe_layer"] and chosen.alpha == pytest.approx(params["alpha"])
    validation = result["chosen"]["validation"]
    assert set(validation) == {"unedited", "edited"} and validation["edited"]["mean_kl"] >= 0
    assert (
        result["settings"]["trials"] == 3
        and json.loads((out / "front.json").read_text())["chosen"]["trial"] == result["chosen"]["trial"]
    )

    more = tune(model, tok, _settings(data_dir, trials=4), out, progress=False)  # resume: one more trial, same study
    assert len(more["trials"]) == 4 and [t["number"] for t in more["trials"]][:3] == [
        t["number"] for t in result["trials"]
    ]
    # the resumed sampler does not replay the first run's random draws (trial 0 is the enqueued start point)
    assert more["trials"][3]["params"] != more["trials"][1]["params"]

    with pytest.raises(SurgeryError, match="other settings .*limit"):
        tune(model, tok, _settings(data_dir, trials=4, limit=2), out, progress=False)


def test_a_constraint_no_trial_meets_names_the_closest(tmp_path, data_dir):
    model, tok = make_tiny("llama"), CharTokenizer()
    out = tmp_path / "tune"
    with pytest.raises(SurgeryError, match=r"no trial meets the constraints .* the closest is trial \d"):
        tune(model, tok, _settings(data_dir, trials=2, max_kl=1e-12), out, progress=False)
    assert not (out / "chosen.yaml").exists() and not (out / "front.json").exists()


@pytest.mark.parametrize(
    "space, message",
    [
        ({"alhpa": {"low": 0, "high": 1}}, "unknown knob 'alhpa'"),
        ({"alpha": {"low": 1, "high": 0}}, "low <= high"),
        ({"pooling": {"choices": []}}, "non-empty list"),
        ({"pooling": ["mean"]}, "must be {choices"),
        ({"alpha": {"low": 0, "high": 1, "step": 2}}, "unknown key"),
    ],
)
def test_bad_search_spaces_are_named(space, message):
    with pytest.raises(SurgeryError, match=message):
        check_space(space)


def test_cli_tune_rejects_a_bad_space_file_in_one_line(tmp_path):
    from helpers import assert_one_line_error, surgery

    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump({"probe_layers": {"choices": [1]}}))
    assert_one_line_error(surgery("tune", "--space", bad, "--out", tmp_path / "t"), "unknown knob 'probe_layers'")
    assert_one_line_error(surgery("tune", "--suites", "rtp,safeedit", "--out", tmp_path / "t"), "--suites takes rtp")
    assert not (tmp_path / "t").exists()


def test_self_probe_data_needs_both_classes(tmp_path, data_dir, monkeypatch):
    """A tiny random model's continuations are gibberish the judge calls non-toxic: one class, a clear error."""
    from surgery_plugin.pipeline import load_probe_data

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    model, tok = make_tiny("llama"), CharTokenizer()
    monkeypatch.setattr("surgery_plugin.probe_data.SELF_SAMPLES", 0)
    monkeypatch.setattr("surgery_plugin.probe_data.SELF_NEW_TOKENS", 3)
    with pytest.raises(SurgeryError, match=r"probe_data 'self' gave \d+ acceptable and 0 undesired"):
        load_probe_data("self", model, tok, data_dir, self_judge="profanity", progress=False)
    cached = list((tmp_path / "cache" / "probe_data").glob("self-*.json"))
    assert len(cached) == 1, "the continuations are cached per weights and settings"
    rows = json.loads(cached[0].read_text())
    assert 350 <= len(rows) <= 400 and {"prompt", "continuation", "score"} <= set(
        rows[0]
    )  # 400 prompts, empty dropped
    with pytest.raises(SurgeryError, match="needs the model"):
        load_probe_data("davidson+self", None, None, data_dir)


def test_the_front_keeps_exactly_the_undominated_points():
    from surgery_plugin.commands.tune.study import pareto_front

    values = [[0.5, 0.1, 0.2], [0.6, 0.1, 0.2], [0.4, 0.3, 0.1], [0.5, 0.1, 0.2], [0.9, 0.0, 0.5]]
    # [1] is dominated by [0]; equal points ([0], [3]) do not dominate each other
    assert pareto_front(values) == [0, 2, 3, 4]


def test_each_behavior_declares_what_its_search_tries():
    """The default search of a behavior tries that behavior's probe data and objective suites, never toxicity's."""
    from surgery_plugin.behaviors import BEHAVIORS
    from surgery_plugin.commands.tune.study import TUNABLE_SUITES, default_space
    from surgery_plugin.data.probe_data import BEHAVIOR_DATASETS

    for spec in BEHAVIORS.values():
        assert spec.tune_suites and set(spec.tune_suites) <= set(TUNABLE_SUITES), spec.name
        space = check_space(default_space(30, spec.probe_data_choices))
        assert space["probe_data"]["choices"] == list(spec.probe_data_choices), spec.name
        assert spec.probe_data in spec.probe_data_choices
        for choice in spec.probe_data_choices:  # every part is a known data set (or the model's own continuations)
            assert all(p in BEHAVIOR_DATASETS or p == "self" for p in choice.split("+")), choice
    assert default_space(30)["probe_data"]["choices"] == list(BEHAVIORS["toxicity"].probe_data_choices)


def test_stack_on_searches_the_next_edit_with_the_first_one_active(tmp_path, data_dir):
    """--stack-on: every trial and the validation are measured with the fixed adapter active as well, the
    baseline stays the unedited model, and a resumed study must stack on the same adapter."""
    from surgery_plugin import export_adapter
    from surgery_plugin.core.edit import execute_surgery
    from surgery_plugin.core.provenance import gate_fingerprint
    from surgery_plugin.pipeline import load_probe_data, make_probe

    model, tok = make_tiny("llama"), CharTokenizer()
    before = gate_fingerprint(model)
    hp = SurgeryHyperParams.from_dict(_settings(data_dir).base_hparams)
    probe, _ = make_probe(model, tok, load_probe_data("davidson", None, None, data_dir, 20), 2, progress=False)
    first = export_adapter(
        execute_surgery(model, probe, hp.replace(alpha=1.0, top_k=0.2)), model, tmp_path / "first", "tiny-llama"
    )
    # a search whose own edits are almost nothing: every trial's KL is then the fixed adapter's
    tiny_step = {**SPACE, "alpha": {"low": 1e-6, "high": 2e-6}}
    alone = tune(model, tok, _settings(data_dir, space=tiny_step, trials=2), tmp_path / "alone", progress=False)
    model = make_tiny("llama")  # a fresh copy: the search above left its (inactive) adapters in the modules
    stacked = tune(
        model,
        tok,
        _settings(data_dir, space=tiny_step, trials=2, stack_on=str(first)),
        tmp_path / "stacked",
        progress=False,
    )
    assert max(t["values"]["kl"] for t in alone["trials"]) < 1e-6
    on_top = stacked["stack_on"]["tuning_alone"]["kl"]
    assert on_top > 1e-4 and all(t["values"]["kl"] == pytest.approx(on_top, rel=1e-2) for t in stacked["trials"])
    assert stacked["chosen"]["validation"]["edited"]["mean_kl"] > 1e-4
    assert stacked["baseline"] == alone["baseline"]  # the base numbers are the unedited model's
    assert len(stacked["stack_on"]["sha256"]) == 64 and "on top of the adapter" in (
        (tmp_path / "stacked" / "chosen.yaml").read_text()
    )
    other = export_adapter(
        execute_surgery(model, probe, hp.replace(alpha=0.5, top_k=0.2)), model, tmp_path / "other", "tiny-llama"
    )
    with pytest.raises(SurgeryError, match="other settings .*stack_on_sha256"):
        tune(
            model,
            tok,
            _settings(data_dir, space=tiny_step, trials=3, stack_on=str(other)),
            tmp_path / "stacked",
            progress=False,
        )
    with pytest.raises(SurgeryError, match="not a surgery adapter folder"):
        tune(model, tok, _settings(data_dir, stack_on=str(tmp_path)), tmp_path / "x", progress=False)
    assert gate_fingerprint(model) == before
