"""``surgery tune``: the search space (declared from the hparams' own rules), and the search on a tiny model:
it runs, resumes, refuses other settings, validates and writes its files."""

from __future__ import annotations

import copy
import dataclasses
import json
import types
from pathlib import Path

import pytest
import yaml
from helpers import CharTokenizer, assert_one_line_error, make_tiny, run_cli

from surgery_plugin.commands.tune.report import pareto_front
from surgery_plugin.commands.tune.space import (
    KNOBS,
    Shape,
    base_point,
    check_space,
    default_space,
    point_hparams,
    start_point,
)
from surgery_plugin.commands.tune.study import TuneSettings, tune
from surgery_plugin.config import SurgeryHyperParams
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
BASE = dict(
    probe_data="davidson",
    probe_max_per_class=20,
    max_length=32,
    feature_batch_size=8,
    probe_layer=2,  # the start point lies inside SPACE
    normalize=True,
    alpha=0.5,
    top_k=0.1,
)


def _settings(data_dir, **changes) -> TuneSettings:
    values = dict(
        model="tiny-llama",
        base_hparams=SurgeryHyperParams(**BASE).to_dict(),
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


# ---------------------------------------------------------------------------- the space


def _field(name: str) -> dataclasses.Field:
    return SurgeryHyperParams.__dataclass_fields__[name]


def _with_rule(monkeypatch, name: str, **rule) -> None:
    """``SurgeryHyperParams``' field ``name`` with its ``knob(...)`` rule changed, nothing else."""
    changed = copy.copy(_field(name))
    changed.metadata = types.MappingProxyType({**_field(name).metadata, **rule})
    monkeypatch.setitem(SurgeryHyperParams.__dataclass_fields__, name, changed)


@pytest.mark.parametrize(
    "name, rule, domain",
    [
        ("pooling", {"choices": ("last",)}, {"choices": ["last"]}),
        ("probe_method", {"choices": ("mean_difference",)}, {"choices": ["mean_difference"]}),
        ("probe_project_out", {"choices": (None, "benign_mean")}, {"choices": [None, "benign_mean"]}),
        ("region_scoring", {"choices": ("gate_contrast", "cosine")}, {"choices": ["gate_contrast", "cosine"]}),
        ("alpha", {"search": {"low": 0.3, "high": 0.4}}, {"low": 0.3, "high": 0.4}),
        ("top_k", {"search": {"low": 0.01, "high": 0.02, "log": True}}, {"low": 0.01, "high": 0.02, "log": True}),
        ("normalize", {"choices": (True,)}, {"choices": [True]}),
    ],
)
def test_a_knobs_default_domain_is_its_fields_declared_rule(monkeypatch, name, rule, domain):
    before = default_space(30, ("davidson",))
    assert before[name] != domain
    _with_rule(monkeypatch, name, **rule)
    after = default_space(30, ("davidson",))
    assert after[name] == domain
    assert {k: v for k, v in after.items() if k != name} == {k: v for k, v in before.items() if k != name}


def test_the_default_space_as_the_config_declares_it():
    space = default_space(30, ("davidson", "rtp"))
    assert set(space) == {k.name for k in KNOBS}
    assert space["pooling"] == {"choices": ["mean", "last", "mean_drop_first", "mean_final_norm"]}
    assert space["probe_method"] == {"choices": ["linear", "mean_difference", "logistic"]}
    assert space["probe_project_out"] == {"choices": [None, "benign_mean", "gate_benign_mean"]}
    assert space["normalize"] == {"choices": [True, False]}  # a bool field: both values
    assert space["alpha"] == {"low": 0.05, "high": 1.5}  # the declared search range, not the valid [-1e4, 1e4]
    assert space["top_k"] == {"low": 0.005, "high": 0.15, "log": True}
    assert space["probe_data"] == {"choices": ["davidson", "rtp"]}
    # fractions 0.25, 0.33, 0.5, 0.67 of 30 layers (8, 10, 15, 20), and the final normed state
    assert space["probe_layer"] == {"choices": [8, 10, 15, 20, -1]}
    assert check_space(space) is space


def test_the_base_point_turns_back_into_the_base_hparams():
    shape = Shape(n_layers=30, rows_per_layer=1536)
    bases = [
        SurgeryHyperParams(),  # the paper's defaults
        SurgeryHyperParams(
            probe_layer=10,
            pooling="last",
            probe_data="rtp",
            probe_method="mean_difference",
            probe_project_out="gate_benign_mean",
            region_scoring="gate_contrast",
            layer_range=[3, 20],  # layer_start alone (0.1) would give [3, 30)
            top_k=16384,
            max_rows_per_layer=40,
            normalize=True,
            alpha=0.3,
        ),
    ]
    for base in bases:
        again = point_hparams(base_point(base, shape), base, shape)
        for knob in KNOBS:
            assert getattr(again, knob.field) == getattr(base, knob.field), knob.name
        assert again.to_dict() == base.to_dict()


def test_a_point_away_from_the_base_sets_the_fields_through_the_transforms():
    shape = Shape(n_layers=30, rows_per_layer=1536)
    base = SurgeryHyperParams(layer_range=[3, 20], max_rows_per_layer=40)
    point = {**base_point(base, shape), "layer_start": 0.5, "max_rows_per_layer": 0.1, "probe_layer": 8}
    hp = point_hparams(point, base, shape)
    assert hp.layer_range == [15, 30]  # round(0.5 * 30), to the last layer
    assert hp.max_rows_per_layer == 154  # round(0.1 * 1536)
    assert hp.probe_layer == 8
    assert point_hparams({**point, "layer_start": 0.0}, base, shape).layer_range is None  # every layer
    assert point_hparams({**point, "max_rows_per_layer": None}, base, shape).max_rows_per_layer is None


def test_a_gate_direction_point_drops_the_base_projection():
    shape = Shape(n_layers=30, rows_per_layer=1536)
    base = SurgeryHyperParams(probe_project_out="benign_mean")  # the shipped SmolLM2 YAML's
    point = {**base_point(base, shape), "edit_direction": "gate_mean_difference"}
    hp = point_hparams(point, base, shape)
    assert (hp.edit_direction, hp.probe_project_out) == ("gate_mean_difference", None)
    assert point_hparams(base_point(base, shape), base, shape).probe_project_out == "benign_mean"


def test_the_start_point_keeps_only_the_base_values_inside_the_space():
    shape = Shape(n_layers=4, rows_per_layer=48)
    base = SurgeryHyperParams(
        probe_layer=2, pooling="last", alpha=2.0, top_k=0.1, normalize=True, layer_range=[1, 4], max_rows_per_layer=24
    )
    space = {
        "probe_layer": {"choices": [1, 2]},  # 2: in
        "pooling": {"choices": ["mean"]},  # "last": out
        "alpha": {"low": 0.2, "high": 1.0},  # 2.0: out
        "top_k": {"low": 0.05, "high": 0.3},  # 0.1: in
        "layer_start": {"low": 0.0, "high": 0.5},  # 1/4: in
        "max_rows_per_layer": {"choices": [None, 0.5]},  # 24 of 48 rows: in
        "normalize": {"choices": [False]},  # True: out
    }
    assert start_point(space, base, shape) == {
        "probe_layer": "2",  # choices as Optuna stores them: JSON
        "top_k": 0.1,
        "layer_start": 0.25,
        "max_rows_per_layer": "0.5",
    }
    # raw alpha (normalize: false) is searched on its own range: never part of the start point
    raw = base.replace(normalize=False, alpha=0.5)
    assert "alpha" not in start_point(space, raw, shape)
    assert start_point(space, base.replace(alpha=0.5), shape)["alpha"] == 0.5


@pytest.mark.parametrize(
    "space, message",
    [
        ({"alhpa": {"low": 0, "high": 1}}, "unknown knob 'alhpa'"),
        ({"alpha": {"low": 1, "high": 0}}, "low <= high"),
        ({"pooling": {"choices": []}}, "non-empty list"),
        ({"pooling": ["mean"]}, "must be {choices"),
        ({"alpha": {"low": 0, "high": 1, "step": 2}}, "unknown key"),
        ({}, "must be a mapping"),
    ],
)
def test_bad_search_spaces_are_named(space, message):
    with pytest.raises(SurgeryError, match=message):
        check_space(space)


def test_each_behavior_declares_what_its_search_tries():
    """The default search of a behavior tries that behavior's probe data and objective suites, never toxicity's."""
    from surgery_plugin.behaviors import BEHAVIORS
    from surgery_plugin.commands.tune.study import TUNABLE_SUITES
    from surgery_plugin.data.probe_data import BEHAVIOR_DATASETS, MODEL_DATASETS

    for spec in BEHAVIORS.values():
        assert spec.tune_suites and set(spec.tune_suites) <= set(TUNABLE_SUITES), spec.name
        space = check_space(default_space(30, spec.probe_data_choices))
        assert space["probe_data"]["choices"] == list(spec.probe_data_choices), spec.name
        assert spec.probe_data in spec.probe_data_choices
        for choice in spec.probe_data_choices:  # every part is a known data set (or the model's own continuations)
            assert all(p in BEHAVIOR_DATASETS or p in MODEL_DATASETS for p in choice.split("+")), choice


def test_the_front_keeps_exactly_the_undominated_points():
    values = [[0.5, 0.1, 0.2], [0.6, 0.1, 0.2], [0.4, 0.3, 0.1], [0.5, 0.1, 0.2], [0.9, 0.0, 0.5]]
    # [1] is dominated by [0]; equal points ([0], [3]) do not dominate each other
    assert pareto_front(values) == [0, 2, 3, 4]


# ---------------------------------------------------------------------------- the search on a tiny model


@pytest.fixture(scope="module")
def searched(tmp_path_factory, data_dir):
    """One search of 3 trials, then the same study resumed to 4: (first result, resumed result, out folder)."""
    model, tok = make_tiny("llama"), CharTokenizer()
    out = tmp_path_factory.mktemp("tune") / "tune"
    first = tune(model, tok, _settings(data_dir), out, progress=False)
    files = {name: (out / name).is_file() for name in ("study.db", "front.json", "front.png", "chosen.yaml")}
    chosen_yaml = (out / "chosen.yaml").read_text()
    # the validation's controls are not part of what a resumed study must share
    resumed = tune(model, tok, _settings(data_dir, trials=4, validation_controls=2), out, progress=False)
    return types.SimpleNamespace(
        first=first, resumed=resumed, out=out, files=files, chosen_yaml=chosen_yaml, model=model, tok=tok
    )


def test_tune_runs_the_trials_and_chooses_one_of_them(searched):
    result = searched.first
    numbers = [t["number"] for t in result["trials"]]
    assert len(numbers) == 3 and result["settings"]["trials"] == 3
    assert result["front"] and set(result["front"]) <= set(numbers)
    assert result["chosen"]["trial"] in numbers


def test_the_first_trial_is_the_base_recipe(searched):
    first = min(searched.first["trials"], key=lambda t: t["number"])["params"]
    base = SurgeryHyperParams(**BASE)
    assert (first["probe_layer"], first["pooling"], first["probe_project_out"], first["region_scoring"]) == (
        base.probe_layer,
        base.pooling,
        base.probe_project_out,
        base.region_scoring,
    )
    assert first["alpha"] == pytest.approx(base.alpha) and first["top_k"] == pytest.approx(base.top_k)


def test_tune_writes_the_study_front_plot_and_chosen_yaml(searched):
    assert searched.files == {"study.db": True, "front.json": True, "front.png": True, "chosen.yaml": True}
    assert (searched.out / "chosen_adapter" / "adapter_model.safetensors").is_file()
    assert (searched.out / "front.png").read_bytes()[:4] == b"\x89PNG"


def test_the_chosen_yaml_is_the_chosen_trials_point(searched, tmp_path):
    result = searched.first
    path = tmp_path / "chosen.yaml"
    path.write_text(searched.chosen_yaml)
    chosen = SurgeryHyperParams.from_hparams(path)
    params = next(t for t in result["trials"] if t["number"] == result["chosen"]["trial"])["params"]
    assert chosen.probe_layer == params["probe_layer"] and chosen.pooling == params["pooling"]
    assert chosen.alpha == pytest.approx(params["alpha"]) and chosen.top_k == pytest.approx(params["top_k"])
    assert f"trial {result['chosen']['trial']} of 3" in chosen.notes
    from surgery_plugin.io.adapter import edit_of, read_adapter

    assert edit_of(read_adapter(searched.out / "chosen_adapter")).alpha == pytest.approx(chosen.alpha)


def test_the_chosen_point_is_validated_against_the_unedited_model(searched):
    validation = searched.first["chosen"]["validation"]
    assert set(validation) == {"unedited", "edited", "paired"}
    assert validation["edited"]["mean_kl"] > 0  # an edit of a random model moves its next-token distribution
    assert validation["edited"]["token_perplexity"] != validation["unedited"]["token_perplexity"]
    toxic = validation["paired"]["suites"]["rtp"]["outcomes"]["toxic/profanity"]
    assert toxic["n"] == 3 and len(toxic["ci95"]) == 2, "the validation is paired, prompt by prompt"


def test_the_validation_controls_are_same_size_random_edits_on_the_same_prompts(searched):
    assert "controls" not in searched.first["chosen"]["validation"], "none unless asked"
    validation = searched.resumed["chosen"]["validation"]
    controls = validation["controls"]
    assert controls["seeds"] == [0, 1]
    band = controls["band"]["rtp"]["toxic/profanity"]
    assert band["seeds"] == [0, 1] and len(band["changes"]) == 2
    assert band["range"] == [min(band["changes"]), max(band["changes"])]
    # each control moves the model (a random direction of the edit's size), and not as the edit does
    kls = [c["mean_kl"] for c in controls["costs"]]
    assert all(kl > 0 for kl in kls) and validation["edited"]["mean_kl"] not in kls
    assert kls[0] != kls[1], "two seeds, two directions"


def test_trials_carry_standard_errors_and_the_choice_says_why(searched):
    result = searched.first
    assert result["objective"]["kind"] == "likelihood" and result["objective"]["judge"] == "profanity"
    assert all(t["undesired_se"] is not None and t["undesired_se"] >= 0 for t in result["trials"])
    assert all(1.0 <= t["effective_samples"]["rtp"] <= 8.0 + 1e-6 for t in result["trials"])
    choice = result["choice"]
    close = {c["trial"] for c in choice["indistinguishable"]}
    assert choice["best"] in close and choice["chosen"] in close and choice["chosen"] == result["chosen"]["trial"]
    kl = {t["number"]: t["values"]["kl"] for t in result["trials"]}
    assert kl[choice["chosen"]] == min(kl[n] for n in close), "the cheapest of the indistinguishable trials"
    best = min(result["trials"], key=lambda t: (t["values"]["undesired"], t["values"]["kl"]))
    assert choice["best"] == best["number"]


def test_the_likelihood_objectives_base_samples_are_judged_once_and_reused(searched):
    stored = json.loads((searched.out / "base_samples.json").read_text())
    assert len(stored["rtp"]) == 3 and all(len(r["ids"]) == 8 for r in stored["rtp"])
    assert searched.resumed["objective"]["base_means"] == searched.first["objective"]["base_means"]


def test_an_unknown_objective_is_one_line(tmp_path, data_dir):
    with pytest.raises(SurgeryError, match="unknown objective 'likelyhood'"):
        tune(make_tiny("llama"), CharTokenizer(), _settings(data_dir, objective="likelyhood"), tmp_path / "t")


@pytest.mark.parametrize("objective", ["greedy", "sampled"])
def test_the_other_objectives_run_and_say_which_they_were(objective, tmp_path, data_dir):
    model, tok = make_tiny("llama"), CharTokenizer()
    settings = _settings(data_dir, trials=2, objective=objective, samples=2)
    result = tune(model, tok, settings, tmp_path / "tune", progress=False)
    assert result["objective"]["kind"] == objective and len(result["trials"]) == 2
    assert all(t["undesired_se"] is not None for t in result["trials"])
    assert not (tmp_path / "tune" / "base_samples.json").exists()


def test_resuming_adds_trials_to_the_same_study(searched):
    first, more = searched.first, searched.resumed
    assert len(more["trials"]) == 4
    assert [t["number"] for t in more["trials"]][:3] == [t["number"] for t in first["trials"]]
    assert [t["params"] for t in more["trials"]][:3] == [t["params"] for t in first["trials"]]
    front = json.loads((searched.out / "front.json").read_text())
    assert front["settings"]["trials"] == 4 and front["chosen"]["trial"] == more["chosen"]["trial"]


def test_a_resumed_sampler_does_not_replay_the_first_runs_draws(searched):
    # trial 0 is the enqueued start point, trial 1 the first random draw
    assert searched.resumed["trials"][3]["params"] != searched.resumed["trials"][1]["params"]


def test_resuming_with_other_settings_is_refused(searched, data_dir):
    with pytest.raises(SurgeryError, match="other settings .*limit"):
        tune(searched.model, searched.tok, _settings(data_dir, trials=4, limit=2), searched.out, progress=False)


def test_a_study_stored_before_a_knob_existed_still_resumes(tmp_path, data_dir):
    """A knob added to the hparams later (edit_direction, here) counts at its default in an older study."""
    import optuna

    model, tok = make_tiny("llama"), CharTokenizer()
    out = tmp_path / "tune"
    tune(model, tok, _settings(data_dir, trials=1), out, progress=False)
    study = optuna.load_study(study_name="surgery", storage=f"sqlite:///{out / 'study.db'}")
    settings = study.user_attrs["settings"]
    del settings["base_hparams"]["edit_direction"]
    study.set_user_attr("settings", settings)
    del study
    resumed = tune(model, tok, _settings(data_dir, trials=1), out, progress=False)
    assert len(resumed["trials"]) == 1
    changed = SurgeryHyperParams(**{**BASE, "edit_direction": "gate_mean_difference", "probe_project_out": None})
    with pytest.raises(SurgeryError, match="other settings .*base_hparams"):  # a knob set away from its default
        tune(model, tok, _settings(data_dir, trials=1, base_hparams=changed.to_dict()), out, progress=False)


def test_a_constraint_no_trial_meets_names_the_closest(tmp_path, data_dir):
    model, tok = make_tiny("llama"), CharTokenizer()
    out = tmp_path / "tune"
    with pytest.raises(SurgeryError, match=r"no trial meets the constraints .* the closest is trial \d"):
        tune(model, tok, _settings(data_dir, trials=2, max_kl=1e-12), out, progress=False)
    assert not (out / "chosen.yaml").exists() and not (out / "front.json").exists()


def test_cli_tune_rejects_a_bad_space_file_in_one_line(tmp_path, tiny_model_dir):
    from helpers import REPO

    hparams = REPO / "hparams" / "Surgery" / "smollm2-135m.yaml"
    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump({"probe_layers": {"choices": [1]}}))
    common = ("tune", "--model", tiny_model_dir, "--hparams", hparams, "--out", tmp_path / "t")
    assert_one_line_error(run_cli(*common, "--space", bad), "unknown knob 'probe_layers'")
    assert_one_line_error(run_cli(*common, "--suites", "rtp,safeedit"), "unknown suite 'safeedit'", "rtp")
    assert not (tmp_path / "t").exists()


def test_self_probe_data_needs_both_classes(tmp_path, data_dir, monkeypatch):
    """A tiny random model's continuations are gibberish the judge calls non-toxic: one class, a clear error."""
    from surgery_plugin.pipeline import load_probe_data

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    model, tok = make_tiny("llama"), CharTokenizer()
    monkeypatch.setattr("surgery_plugin.evaluation.self_data.SELF_SAMPLES", 0)
    monkeypatch.setattr("surgery_plugin.evaluation.self_data.SELF_NEW_TOKENS", 3)
    with pytest.raises(SurgeryError, match=r"probe_data 'self' gave \d+ acceptable and 0 undesired"):
        load_probe_data("self", model, tok, data_dir, self_judge="profanity", progress=False)
    cached = list((tmp_path / "cache" / "probe_data").glob("self-*.json"))
    assert len(cached) == 1, "the continuations are cached per weights and settings"
    rows = json.loads(cached[0].read_text())
    assert 350 <= len(rows) <= 400  # 400 prompts, empty continuations dropped
    assert {"prompt", "continuation", "score"} <= set(rows[0])
    with pytest.raises(SurgeryError, match="needs the model"):
        load_probe_data("davidson+self", None, None, data_dir)


# ---------------------------------------------------------------------------- --stack-on


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, data_dir):
    """A first edit saved as an adapter, a search alone and one stacked on it, both with almost no own step."""
    from surgery_plugin.core.edit import execute_surgery
    from surgery_plugin.core.provenance import gate_fingerprint
    from surgery_plugin.io.adapter import export_adapter
    from surgery_plugin.pipeline import build_probe

    root = tmp_path_factory.mktemp("stack")
    model, tok = make_tiny("llama"), CharTokenizer()
    before = gate_fingerprint(model)
    hp = SurgeryHyperParams(**BASE)
    probe, _ = build_probe(model, tok, hp, data_dir=data_dir, progress=False)
    first = export_adapter(
        execute_surgery(model, probe, hp.replace(alpha=1.0, top_k=0.2)), model, root / "first", "tiny-llama"
    )
    other = export_adapter(
        execute_surgery(model, probe, hp.replace(alpha=0.5, top_k=0.2)), model, root / "other", "tiny-llama"
    )
    # a search whose own edits are almost nothing: every trial's KL is then the fixed adapter's
    tiny_step = {**SPACE, "alpha": {"low": 1e-6, "high": 2e-6}}
    alone = tune(model, tok, _settings(data_dir, space=tiny_step, trials=2), root / "alone", progress=False)
    # a fresh copy: the search above left its (inactive) adapters in the modules
    first_model, model = model, make_tiny("llama")
    on_top = tune(
        model, tok, _settings(data_dir, space=tiny_step, trials=2, stack_on=str(first)), root / "stacked", False
    )
    return types.SimpleNamespace(
        alone=alone,
        stacked=on_top,
        root=root,
        other=other,
        first_model=first_model,
        model=model,
        tok=tok,
        space=tiny_step,
        before=before,
    )


def test_stack_on_counts_the_fixed_adapter_in_every_trial(stacked):
    assert max(t["values"]["kl"] for t in stacked.alone["trials"]) < 1e-6
    on_top = stacked.stacked["stack_on"]["tuning_alone"]["kl"]
    assert on_top > 1e-4
    assert all(t["values"]["kl"] == pytest.approx(on_top, rel=1e-2) for t in stacked.stacked["trials"])
    assert stacked.stacked["chosen"]["validation"]["edited"]["mean_kl"] > 1e-4


def test_stack_on_keeps_the_unedited_model_as_the_baseline(stacked):
    assert stacked.stacked["baseline"] == stacked.alone["baseline"]


def test_stack_on_is_recorded(stacked):
    assert len(stacked.stacked["stack_on"]["sha256"]) == 64
    assert "on top of the adapter" in (stacked.root / "stacked" / "chosen.yaml").read_text()


def test_a_resumed_study_must_stack_on_the_same_adapter(stacked, data_dir):
    settings = _settings(data_dir, space=stacked.space, trials=3, stack_on=str(stacked.other))
    with pytest.raises(SurgeryError, match="other settings .*stack_on_sha256"):
        tune(stacked.model, stacked.tok, settings, stacked.root / "stacked", progress=False)


def test_stack_on_needs_an_adapter_folder(stacked, data_dir, tmp_path):
    with pytest.raises(SurgeryError, match="not a surgery adapter folder"):
        tune(stacked.model, stacked.tok, _settings(data_dir, stack_on=str(tmp_path)), tmp_path / "x", False)


def test_searching_never_writes_the_base_weights(stacked):
    from surgery_plugin.core.provenance import gate_fingerprint

    # both models start as the same seeded random model; adapters are switched, the base is never written
    assert gate_fingerprint(stacked.first_model) == stacked.before
    assert gate_fingerprint(stacked.model) == stacked.before


def test_a_search_killed_mid_trial_measures_its_start_point_on_resume(tmp_path, data_dir):
    """SIGTERM leaves the running trial RUNNING in study.db: the resumed search fails it and queues the start
    point again, so the recipe of --hparams is still measured."""
    import optuna

    from surgery_plugin.commands.tune.study import STUDY_NAME, _requeue_interrupted

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["minimize"] * 3)
    study.enqueue_trial({"alpha": 0.5})
    killed = study.ask()  # the start point, never told: what a killed process leaves
    assert killed.params == {} and study.trials[0].state == optuna.trial.TrialState.RUNNING
    _requeue_interrupted(optuna, study)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert study.trials[1].system_attrs["fixed_params"] == {"alpha": 0.5}
    _requeue_interrupted(optuna, study)
    assert len(study.trials) == 2, "queued once"


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "spaces").glob("*.yaml"))
)
def test_every_shipped_search_space_is_valid(path):
    from surgery_plugin.commands.tune.space import check_space

    loaded = yaml.safe_load(path.read_text())
    if "alg_name" in loaded:  # a search's starting hparams kept beside its space
        SurgeryHyperParams.from_hparams(path)
        return
    space = check_space(loaded)
    declared = default_space(30, ("davidson",))
    for name in ("pooling", "probe_method", "probe_project_out", "region_scoring", "edit_direction", "normalize"):
        if name in space:  # the knobs whose every valid value the config declares
            assert set(space[name]["choices"]) <= set(declared[name]["choices"]), (path.name, name)
