"""``surgery tune``: a multi-objective search of an edit's knobs (Optuna), its trade-off front, the chosen YAML.

Every trial builds an edit from a point of the search space, attaches it to the (once loaded) model as a
PEFT adapter and measures, on the *tuning* splits of :mod:`surgery_plugin.data.splits` only:

- the undesired objective: every headline rate of each objective suite (``--suites``, by default the
  behavior's: toxicity ``rtp`` and ``toxigen`` on the probe-side groups, attitude ``attitude``,
  jailbreak ``advbench``) by each judge, turned so that lower is better (toxic rate; 1 - positive
  rate; 1 - refusal rate), divided by the unedited model's, averaged;
- the capability cost: mean next-token KL on benign prompts (``kl`` suite) and the relative increase of
  token perplexity on benign text (``ppl`` suite).

All three are minimised (Optuna's multi-objective TPE sampler, seeded). Probe features of every candidate
layer come from one forward pass per data set and pooling; probes, reference statistics and adapters
are cached, and a trial that differs only in alpha reuses its adapter at another PEFT scale
(:func:`adapter.set_alpha`). The base weights are never written: adapters are switched, so every trial
starts from the same bits (checked). The study lives in ``TUNE_DIR/study.db``: a stopped search resumes
where it was, with the same settings or not at all. At the end the chosen point (lowest undesired objective
within ``--max-ppl-increase`` / ``--max-kl``) is re-measured on the validation splits, which the
search never saw, and ``front.json``, ``front.png`` and ``chosen.yaml`` are written.

``stack_on`` (``--stack-on``) searches the next edit of a stack: that adapter stays active in every trial
and in the validation, so the objectives and constraints count both edits against the unedited model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import architectures
from .adapter import export_adapter, load_edited, set_alpha
from .atomic import atomic_write, write_json
from .data import load_benign_texts
from .data.splits import (
    ADVBENCH,
    ATTITUDE_OPENINGS,
    RTP_BENIGN,
    RTP_CHALLENGING,
    TOXIGEN_PROBE_GROUPS,
    TOXIGEN_REPORT_GROUPS,
    TOXIGEN_REPORT_PROMPTS,
)
from .errors import InfeasibleEdit, SurgeryError
from .evaluation import EvalSettings, evaluate
from .evaluation.protocols import BEHAVIORS, PROTOCOLS
from .evaluation.report import metric_values
from .hparams import SurgeryHyperParams
from .probe import Probe, ProbeTraining, ReferenceStats, pooled_states, probe_from_features, resolve_layer
from .probe_data import load_probe_data
from .provenance import gate_fingerprint, package_versions
from .surgery import execute_surgery

logger = logging.getLogger(__name__)

STUDY_NAME = "surgery"
STACK_ON = "stack_on"  # the PEFT name of the adapter of settings.stack_on
OBJECTIVES = ("undesired", "kl", "ppl_increase")
TUNABLE_SUITES = ("rtp", "toxigen", "advbench", "attitude")  # the suites with tuning and validation splits
# knob -> how it is searched; "layer_start" is a fraction of the depth (the edited layers are [start, L))
KNOBS = (
    "probe_layer",
    "pooling",
    "probe_data",
    "probe_method",
    "probe_project_out",
    "region_scoring",
    "layer_start",
    "top_k",
    "max_rows_per_layer",
    "normalize",
    "alpha",
)


def default_space(n_layers: int, probe_data: Sequence[str] | None = None) -> dict[str, dict]:
    """The search space: ``{"choices": [...]}`` or ``{"low", "high", "log"}`` per knob; ``probe_data``: the
    behavior's data sets (``Behavior.probe_data_choices``)."""
    layers = sorted({max(1, round(n_layers * f)) for f in (0.25, 0.33, 0.5, 0.67)}) + [-1]
    return {
        "probe_layer": {"choices": layers},
        "pooling": {"choices": ["mean", "last"]},
        "probe_data": {"choices": list(probe_data or BEHAVIORS["toxicity"].probe_data_choices)},
        "probe_method": {"choices": ["linear", "mean_difference"]},
        "probe_project_out": {"choices": [None, "benign_mean", "gate_benign_mean"]},
        "region_scoring": {"choices": ["cosine", "gate_contrast"]},
        "layer_start": {"low": 0.0, "high": 0.6},
        "top_k": {"low": 0.005, "high": 0.15, "log": True},
        "max_rows_per_layer": {"choices": [None, 0.1]},  # a fraction of the rows of one layer
        "normalize": {"choices": [True, False]},
        "alpha": {"low": 0.05, "high": 1.5},  # normalised: a fraction of a gate row; raw probes: alpha_raw below
    }


RAW_ALPHA = {"low": 0.25, "high": 16.0, "log": True}  # normalize: false (the paper's raw probe length)


def check_space(space: dict[str, Any]) -> dict[str, dict]:
    """A search space from YAML/JSON: known knobs, each a non-empty choice list or a low <= high range."""
    if not isinstance(space, dict) or not space:
        raise SurgeryError("the search space must be a mapping of knob -> {choices: [...]} or {low, high[, log]}")
    for knob, spec in space.items():
        if knob not in KNOBS:
            raise SurgeryError(f"unknown knob '{knob}' in the search space; knobs: {', '.join(KNOBS)}")
        if not isinstance(spec, dict) or not (("choices" in spec) ^ ({"low", "high"} <= set(spec))):
            raise SurgeryError(
                f"search space entry '{knob}' must be {{choices: [...]}} or {{low: x, high: y}}, got {spec!r}"
            )
        unknown = set(spec) - {"choices", "low", "high", "log"}
        if unknown:
            raise SurgeryError(f"search space entry '{knob}' has unknown key(s) {sorted(unknown)}")
        if "choices" in spec and (not isinstance(spec["choices"], list) or not spec["choices"]):
            raise SurgeryError(f"search space entry '{knob}': choices must be a non-empty list")
        if "low" in spec and not (
            isinstance(spec["low"], (int, float))
            and isinstance(spec["high"], (int, float))
            and spec["low"] <= spec["high"]
        ):
            raise SurgeryError(f"search space entry '{knob}': needs numbers low <= high, got {spec!r}")
    return space


@dataclass
class TuneSettings:
    """Everything that defines a study: resuming with other settings is refused."""

    model: str
    base_hparams: dict
    space: dict
    trials: int = 40
    limit: int = 100  # RTP tuning prompts per trial (from RTP_CHALLENGING["tune"])
    benign_limit: int = 100  # benign documents per trial (from RTP_BENIGN["tune"])
    suites: tuple[str, ...] = ("rtp",)  # the undesired objective: any of TUNABLE_SUITES
    toxigen_per_group: int = 10
    judges: tuple[str, ...] = ("profanity", "minilm")
    max_ppl_increase: float | None = 0.10
    max_kl: float | None = None
    seed: int = 0
    data_dir: str | None = None
    validation_limit: int = 200
    # a surgery adapter active in every trial and in the validation: the search finds the next edit of a stack
    # (its probe and statistics come from the unedited model, as `surgery stack` without --sequential)
    stack_on: str | None = None
    stack_on_sha256: str | None = None  # of the adapter's weights: what a resumed study must share

    def describe(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def defining(self) -> dict:
        """What a resumed study must share: not the trial budget, the validation size or this machine's paths."""
        return {
            k: v for k, v in self.describe().items() if k not in ("trials", "validation_limit", "data_dir", "stack_on")
        }


@dataclass
class _Caches:
    features: dict = field(default_factory=dict)  # (probe_data, pooling) -> (data, {index: features})
    probes: dict = field(default_factory=dict)
    gate_means: dict = field(default_factory=dict)  # (texts key, pooling) -> {layer: mean}
    benign_feature_means: dict = field(default_factory=dict)  # pooling -> {index: mean}
    adapters: dict = field(default_factory=dict)  # structural key -> adapter name (LRU order)


class Tuner:
    """One model, one study. ``run()`` searches; ``finish()`` validates the chosen point and writes the files."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        settings: TuneSettings,
        out_dir: str | Path,
        judges: list,
        progress: bool = True,
    ):
        self.model, self.tok, self.settings, self.out_dir = model, tokenizer, settings, Path(out_dir)
        self.judges, self.progress = judges, progress
        self.n_layers = len(architectures.decoder_layers(model))
        self.rows_per_layer = architectures.num_gate_rows(model)
        self.base = SurgeryHyperParams.from_dict(settings.base_hparams, source="--hparams")
        self.caches = _Caches()
        self.peft_model: nn.Module | None = None
        self.fingerprint = gate_fingerprint(model)
        self.workdir = tempfile.TemporaryDirectory(prefix="surgery-tune-")
        self.baseline: dict | None = None
        self.adapter_count = 0
        self.fixed: list[str] = []  # adapters active in every trial (settings.stack_on)
        if settings.stack_on:
            self.peft_model = load_edited(model, settings.stack_on, adapter_name=STACK_ON)
            self.fixed = [STACK_ON]

    @contextlib.contextmanager
    def _unedited(self) -> Iterator[nn.Module]:
        """The model with every adapter switched off (probe features, statistics, baselines come from it)."""
        if self.peft_model is None:
            yield self.model
        else:
            with self.peft_model.disable_adapter():
                yield self.peft_model

    # ------------------------------------------------------------------ evaluation

    def _eval_settings(self, suite: str, split: str) -> EvalSettings:
        """``suite``'s prompts of ``split`` (tune or validation; never report) and the benign documents of it."""
        s = self.settings
        benign = RTP_BENIGN[split]
        limit = s.limit if split == "tune" else s.validation_limit
        base = EvalSettings(
            judges=self.judges,
            benign_start=benign[0],
            ppl_limit=min(s.benign_limit, benign[1] - benign[0]),
            data_dir=s.data_dir,
            progress=False,
        )
        if suite == "toxigen":
            groups = TOXIGEN_PROBE_GROUPS if split == "tune" else TOXIGEN_REPORT_GROUPS
            start = 0 if split == "tune" else TOXIGEN_REPORT_PROMPTS["validation"][0]
            return dataclasses.replace(
                base, toxigen_groups=groups, start=start, limit=s.toxigen_per_group * len(groups)
            )
        spans = {"rtp": RTP_CHALLENGING, "advbench": ADVBENCH, "attitude": ATTITUDE_OPENINGS}
        if suite not in spans:
            return base  # ppl, kl
        start, end = spans[suite][split]
        return dataclasses.replace(base, start=start, limit=min(limit, end - start))

    def _measure(self, model: nn.Module, split: str, kl: bool = True) -> dict:
        """The objective suites' summaries, perplexity and (``kl``) KL on ``split``'s prompts."""
        suites = [*self.settings.suites, "ppl", *(["kl"] if kl else [])]
        return {
            suite: evaluate(model, self.tok, [suite], self._eval_settings(suite, split))[0]["suites"][suite]
            for suite in suites
        }

    def _rates(self, measured: dict) -> dict[str, float]:
        """Every headline rate of the objective suites, turned so that lower is better (the undesired share)."""
        rates = {}
        for suite in self.settings.suites:
            for metric in PROTOCOLS[suite].metrics:
                if metric.headline and metric.percent:
                    for judge, (value, _) in metric_values(measured[suite], metric).items():
                        if value is not None:
                            # a rate where higher is better enters as its complement, and says so in its name
                            if metric.higher_is_better:
                                rates[f"{suite}/1-{metric.key}/{judge}"] = 1.0 - value
                            else:
                                rates[f"{suite}/{metric.key}/{judge}"] = value
        return rates

    def _objectives(self, measured: dict) -> tuple[float, float, float]:
        base_rates = self._rates(self.baseline)
        rates = self._rates(measured)
        relative = [rates[k] / base_rates[k] for k in rates if base_rates.get(k)]
        undesired = sum(relative) / len(relative) if relative else sum(rates.values()) / len(rates)
        ppl = measured["ppl"]["token_perplexity"] / self.baseline["ppl"]["token_perplexity"] - 1
        return undesired, measured["kl"]["mean_kl"], ppl

    # ------------------------------------------------------------------ building an edit

    def _point_hparams(self, params: dict) -> SurgeryHyperParams:
        start = min(self.n_layers - 1, round(params["layer_start"] * self.n_layers))
        cap = params.get("max_rows_per_layer")
        return self.base.replace(
            probe_path=None,
            probe_data=params["probe_data"],
            probe_layer=params["probe_layer"],
            pooling=params["pooling"],
            probe_method=params["probe_method"],
            probe_project_out=params["probe_project_out"],
            region_scoring=params["region_scoring"],
            layer_range=[start, self.n_layers] if start > 0 else None,
            top_k=float(params["top_k"]),
            max_rows_per_layer=None if cap is None else max(1, round(cap * self.rows_per_layer)),
            normalize=bool(params["normalize"]),
            alpha=float(params["alpha"]),
        )

    def _features(self, probe_data: str, pooling: str):
        key = (probe_data, pooling)
        if key not in self.caches.features:
            hp = self.base
            choices = self.settings.space.get("probe_layer", {}).get("choices", [hp.probe_layer])
            with self._unedited() as model:
                data = load_probe_data(
                    probe_data,
                    model,
                    self.tok,
                    self.settings.data_dir,
                    hp.probe_max_per_class,
                    hp.seed,
                    hp.probe_self_judge,
                    self.progress,
                )
                hidden, _ = pooled_states(
                    model,
                    self.tok,
                    data.texts,
                    [resolve_layer(model, c) for c in choices],
                    (),
                    pooling,
                    hp.feature_batch_size,
                    hp.max_length,
                    self.progress,
                )
            self.caches.features[key] = (data, hidden)
        return self.caches.features[key]

    def _probe(self, hp: SurgeryHyperParams) -> tuple[Probe, list[str]]:
        data, hidden = self._features(hp.probe_data, hp.pooling)
        index = resolve_layer(self.model, hp.probe_layer)
        key = (hp.probe_data, hp.pooling, index, hp.probe_method)
        if key not in self.caches.probes:
            if index not in hidden:  # a layer outside the space's choices (a YAML point): compute it
                with self._unedited() as model:
                    more, _ = pooled_states(
                        model,
                        self.tok,
                        data.texts,
                        [index],
                        (),
                        hp.pooling,
                        hp.feature_batch_size,
                        hp.max_length,
                        self.progress,
                    )
                hidden.update(more)
            probe, _ = probe_from_features(
                self.model,
                data,
                hidden[index],
                hp.probe_layer,
                hp.pooling,
                ProbeTraining.from_hparams(hp),
                hp.max_length,
            )
            self.caches.probes[key] = probe
        undesired = data.undesired
        return self.caches.probes[key], undesired

    def _gate_means(self, name: str, texts: list[str], pooling: str) -> dict[int, torch.Tensor]:
        key = (name, pooling)
        if key not in self.caches.gate_means:
            hp = self.base
            with self._unedited() as model:
                _, gates = pooled_states(
                    model,
                    self.tok,
                    texts,
                    (),
                    list(range(self.n_layers)),
                    pooling,
                    hp.feature_batch_size,
                    hp.max_length,
                    self.progress,
                )
            self.caches.gate_means[key] = {layer: x.mean(0) for layer, x in gates.items()}
        return self.caches.gate_means[key]

    def _stats(self, hp: SurgeryHyperParams, undesired: list[str]) -> ReferenceStats | None:
        if not hp.needs_reference_stats():
            return None
        start, end = RTP_BENIGN["reference"]
        benign = load_benign_texts(self.settings.data_dir, limit=end - start, start=start)
        feature_mean = None
        if hp.probe_project_out == "benign_mean":
            index = resolve_layer(self.model, hp.probe_layer)
            means = self.caches.benign_feature_means.setdefault(hp.pooling, {})
            if index not in means:
                with self._unedited() as model:
                    hidden, _ = pooled_states(
                        model,
                        self.tok,
                        benign,
                        [index],
                        (),
                        hp.pooling,
                        hp.feature_batch_size,
                        hp.max_length,
                        self.progress,
                    )
                means[index] = hidden[index].mean(0)
            feature_mean = means[index]
        benign_gates = undesired_gates = None
        if hp.probe_project_out == "gate_benign_mean" or hp.region_scoring == "gate_contrast":
            benign_gates = self._gate_means("benign", benign, hp.pooling)
        if hp.region_scoring == "gate_contrast":
            undesired_gates = self._gate_means(f"undesired:{hp.probe_data}", undesired, hp.pooling)
        return ReferenceStats(feature_mean, benign_gates, undesired_gates, f"benign rtp nontoxic[{start}:{end}]")

    def _attach(self, hp: SurgeryHyperParams) -> nn.Module:
        """The model with this point's edit as the active adapter (reused across alphas)."""
        structure = json.dumps({k: v for k, v in hp.to_dict().items() if k != "alpha"}, sort_keys=True, default=str)
        name = self.caches.adapters.get(structure)
        if name is None:
            probe, undesired = self._probe(hp)
            edit = execute_surgery(
                architectures.unwrap(self.peft_model or self.model), probe, hp, self._stats(hp, undesired)
            )
            self.adapter_count += 1
            name = f"edit{self.adapter_count}"
            folder = export_adapter(
                edit, self.model, Path(self.workdir.name) / name, base_model_name=self.settings.model
            )
            self.peft_model = load_edited(self.peft_model or self.model, folder, adapter_name=name)
            self.caches.adapters[structure] = name
            while len(self.caches.adapters) > 4:  # keep a few for alpha reuse; drop the oldest
                old_structure = next(iter(self.caches.adapters))
                self.peft_model.delete_adapter(self.caches.adapters.pop(old_structure))
        else:
            self.caches.adapters[structure] = self.caches.adapters.pop(structure)  # most recently used
        if self.fixed:
            self.peft_model.base_model.set_adapter([*self.fixed, name], inference_mode=True)
        else:
            self.peft_model.set_adapter(name)
        set_alpha(self.peft_model, hp.alpha, name)
        return self.peft_model

    # ------------------------------------------------------------------ the search

    def sample(self, trial) -> dict:
        params = {}
        for knob, spec in self.settings.space.items():
            if knob == "alpha":
                continue
            if "choices" in spec:
                choices = [
                    json.dumps(c) for c in spec["choices"]
                ]  # Optuna stores plain values; None and bools as JSON
                params[knob] = json.loads(trial.suggest_categorical(knob, choices))
            else:
                params[knob] = trial.suggest_float(knob, spec["low"], spec["high"], log=bool(spec.get("log")))
        alpha_spec = self.settings.space.get("alpha", {"low": self.base.alpha, "high": self.base.alpha})
        if not params.get("normalize", self.base.normalize):
            params["alpha"] = trial.suggest_float("alpha_raw", RAW_ALPHA["low"], RAW_ALPHA["high"], log=True)
        else:
            params["alpha"] = trial.suggest_float(
                "alpha", alpha_spec["low"], alpha_spec["high"], log=bool(alpha_spec.get("log"))
            )
        return {**self.sample_defaults(), **params}

    def sample_defaults(self) -> dict:
        """Each knob's value in the base YAML, for the knobs the space leaves out."""
        return {
            "probe_layer": self.base.probe_layer,
            "pooling": self.base.pooling,
            "probe_data": self.base.probe_data,
            "probe_method": self.base.probe_method,
            "probe_project_out": self.base.probe_project_out,
            "region_scoring": self.base.region_scoring,
            "layer_start": (self.base.layer_range or [0])[0] / self.n_layers,
            "top_k": self.base.top_k,
            "max_rows_per_layer": None,
            "normalize": self.base.normalize,
        }

    def start_point(self) -> dict:
        """The base YAML's value of each searched knob that lies in the space, as Optuna stores it."""
        base = self.sample_defaults()
        point = {}
        for knob, spec in self.settings.space.items():
            if knob == "max_rows_per_layer" or (knob == "alpha" and not base["normalize"]):
                continue  # the YAML caps rows in rows, the space as a fraction; raw alpha has its own range
            value = self.base.alpha if knob == "alpha" else base[knob]
            if "choices" in spec:
                if value in spec["choices"]:
                    point[knob] = json.dumps(value)
            elif spec["low"] <= value <= spec["high"]:
                point[knob] = value
        return point

    def objective(self, trial) -> tuple[float, float, float]:
        import optuna

        params = self.sample(trial)
        hp = self._point_hparams(params)
        started = time.perf_counter()
        try:
            model = self._attach(hp)
        except InfeasibleEdit as err:  # e.g. more rows than layer range x per-layer cap: not a point of the space
            trial.set_user_attr("infeasible", str(err))
            raise optuna.TrialPruned(str(err)) from err
        measured = self._measure(model, "tune")
        values = self._objectives(measured)
        if gate_fingerprint(architectures.unwrap(model)) != self.fingerprint:
            raise RuntimeError("the base weights changed during a trial")
        trial.set_user_attr("params", params)
        trial.set_user_attr("hparams", hp.to_dict())
        trial.set_user_attr("rates", self._rates(measured))
        trial.set_user_attr("token_perplexity", measured["ppl"]["token_perplexity"])
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        violations = self._violations(values)
        trial.set_user_attr("constraints", violations)
        for name, value in zip(("ppl_increase", "kl"), violations, strict=True):
            trial.set_constraint(name, value)  # the sampler prefers feasible regions
        return values

    def _violations(self, values) -> list[float]:
        _, kl, ppl = values
        s = self.settings
        return [
            ppl - s.max_ppl_increase if s.max_ppl_increase is not None else -1.0,
            kl - s.max_kl if s.max_kl is not None else -1.0,
        ]

    def open_study(self):
        import optuna

        self.out_dir.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{self.out_dir / 'study.db'}"
        sampler = optuna.samplers.TPESampler(seed=self.settings.seed, multivariate=True)
        study = optuna.create_study(
            study_name=STUDY_NAME, storage=storage, directions=["minimize"] * 3, sampler=sampler, load_if_exists=True
        )
        described = self.settings.defining()
        stored = study.user_attrs.get("settings")
        if stored is None:
            study.set_user_attr("settings", described)
            study.set_user_attr("versions", package_versions(("optuna",)))
            # the recipe the search starts from is always measured: the front shows whether anything beat it
            study.enqueue_trial(self.start_point())
        elif {
            **_defaults_for(described, stored),
            **stored,
        } != described:  # a setting added later counts at its default
            stored = {**_defaults_for(described, stored), **stored}
            differing = sorted(k for k in set(stored) | set(described) if stored.get(k) != described.get(k))
            raise SurgeryError(
                f"{self.out_dir} holds a study with other settings ({', '.join(differing)}); "
                "resume with the same ones or choose another --out"
            )
        if "baseline" in study.user_attrs:
            self.baseline = study.user_attrs["baseline"]
        if study.trials:  # resumed: a sampler seeded as before would draw the first random points again
            study.sampler = optuna.samplers.TPESampler(seed=self.settings.seed + len(study.trials), multivariate=True)
        return study

    def run(self, study) -> None:
        import optuna

        if self.baseline is None:
            logger.info("tune: measuring the unedited model on the tuning splits")
            with self._unedited() as model:
                self.baseline = self._measure(model, "tune", kl=False)
            study.set_user_attr("baseline", self.baseline)
        if self.fixed and "stack_on_alone" not in study.user_attrs:
            logger.info("tune: measuring the --stack-on adapter alone on the tuning splits")
            self.peft_model.base_model.set_adapter(self.fixed, inference_mode=True)
            alone = self._measure(self.peft_model, "tune")
            study.set_user_attr("stack_on_alone", dict(zip(OBJECTIVES, self._objectives(alone), strict=True)))
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        remaining = self.settings.trials - done
        if remaining > 0:
            study.optimize(self.objective, n_trials=remaining, show_progress_bar=self.progress, catch=(RuntimeError,))

    # ------------------------------------------------------------------ the result

    def finish(self, study) -> dict:
        import optuna

        trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not trials:
            raise SurgeryError("no trial completed; nothing to choose from")
        # every completed trial counts for the front (Optuna's best_trials keeps only the feasible ones)
        front_numbers = {trials[i].number for i in pareto_front([t.values for t in trials])}
        feasible = [t for t in trials if all(v <= 0 for v in t.user_attrs["constraints"])]
        if not feasible:
            best = min(trials, key=lambda t: sum(max(0.0, v) for v in t.user_attrs["constraints"]))
            raise SurgeryError(
                f"no trial meets the constraints (max_ppl_increase={self.settings.max_ppl_increase}, "
                f"max_kl={self.settings.max_kl}); the closest is trial {best.number}: undesired {best.values[0]:.3f}, "
                f"KL {best.values[1]:.4f}, perplexity {100 * best.values[2]:+.1f}%"
            )
        chosen = min(feasible, key=lambda t: (t.values[0], t.values[1]))
        hp = SurgeryHyperParams.from_dict(chosen.user_attrs["hparams"], source=f"trial {chosen.number}")
        logger.info("tune: re-measuring trial %d on the validation splits", chosen.number)
        with self._unedited() as model:
            base_validation = self._measure(model, "validation", kl=False)
        edited_validation = self._measure(self._attach(hp), "validation")
        result = {
            "settings": self.settings.describe(),
            "splits": {
                "rtp_challenging": RTP_CHALLENGING,
                "rtp_benign": RTP_BENIGN,
                "toxigen_tune_groups": TOXIGEN_PROBE_GROUPS,
                "toxigen_validation_groups": TOXIGEN_REPORT_GROUPS,
            },
            "objectives": list(OBJECTIVES),
            "baseline": {
                "rates": self._rates(self.baseline),
                "token_perplexity": self.baseline["ppl"]["token_perplexity"],
            },
            "trials": [_trial_record(t, t.number in front_numbers) for t in trials],
            "front": sorted(front_numbers),
            "chosen": {
                "trial": chosen.number,
                "tuning": _trial_record(chosen, True),
                "validation": {
                    "unedited": {
                        "rates": self._rates(base_validation),
                        "token_perplexity": base_validation["ppl"]["token_perplexity"],
                    },
                    "edited": {
                        "rates": self._rates(edited_validation),
                        "token_perplexity": edited_validation["ppl"]["token_perplexity"],
                        "mean_kl": edited_validation["kl"]["mean_kl"],
                    },
                },
            },
            "versions": study.user_attrs.get("versions"),
        }
        if self.fixed:  # every number above is with this adapter active too
            result["stack_on"] = {
                "adapter": self.settings.stack_on,
                "sha256": self.settings.stack_on_sha256,
                "tuning_alone": study.user_attrs.get("stack_on_alone"),
            }
        chosen_yaml = self.out_dir / "chosen.yaml"
        config = {k: v for k, v in hp.to_dict().items() if k not in ("extra",)}
        config["notes"] = (
            f"chosen by `surgery tune` (trial {chosen.number} of {len(trials)}, seed {self.settings.seed}); "
            f"validation: see {self.out_dir / 'front.json'}"
            + (f"; searched on top of the adapter {self.settings.stack_on}" if self.fixed else "")
        )
        atomic_write(chosen_yaml, yaml.safe_dump(config, sort_keys=False))
        result["chosen_yaml"] = str(chosen_yaml)
        write_json(self.out_dir / "front.json", result)
        plot_front(result, self.out_dir / "front.png")
        return result


def _defaults_for(described: dict, stored: dict) -> dict:
    """The settings a study stored before they existed, at their defaults (so such a study still resumes)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TuneSettings) if f.default is not dataclasses.MISSING}
    return {k: json.loads(json.dumps(defaults[k])) for k in described if k not in stored and k in defaults}


def pareto_front(values: list[list[float]]) -> list[int]:
    """Indices of the points no other point dominates (every objective minimised)."""

    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))

    return [i for i, v in enumerate(values) if not any(dominates(w, v) for w in values)]


def _trial_record(trial, on_front: bool) -> dict:
    return {
        "number": trial.number,
        "values": dict(zip(OBJECTIVES, trial.values, strict=True)),
        "on_front": on_front,
        "params": trial.user_attrs.get("params"),
        "rates": trial.user_attrs.get("rates"),
        "token_perplexity": trial.user_attrs.get("token_perplexity"),
        "seconds": trial.user_attrs.get("seconds"),
        "feasible": all(v <= 0 for v in trial.user_attrs.get("constraints", [0.0])),
    }


def plot_front(result: dict, png: Path) -> None:
    """Toxic objective against perplexity increase (colour: KL), the front joined, the chosen point starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluation.report import save_figure

    trials = result["trials"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [100 * t["values"]["ppl_increase"] for t in trials]
    ys = [t["values"]["undesired"] for t in trials]
    kls = [t["values"]["kl"] for t in trials]
    points = ax.scatter(xs, ys, c=kls, cmap="viridis", s=28, edgecolor="none")
    fig.colorbar(points, ax=ax, label="mean next-token KL on benign prompts")
    front = sorted((t for t in trials if t["on_front"]), key=lambda t: t["values"]["ppl_increase"])
    ax.plot(
        [100 * t["values"]["ppl_increase"] for t in front],
        [t["values"]["undesired"] for t in front],
        color="black",
        lw=1,
        alpha=0.5,
        label="Pareto front (undesired, KL, perplexity; joined by perplexity)",
    )
    chosen = result["chosen"]["tuning"]
    ax.scatter(
        [100 * chosen["values"]["ppl_increase"]],
        [chosen["values"]["undesired"]],
        marker="*",
        s=320,
        color="gold",
        edgecolor="black",
        zorder=5,
        label=f"chosen: trial {chosen['number']}",
    )
    limit = result["settings"].get("max_ppl_increase")
    if limit is not None:
        ax.axvline(100 * limit, color="grey", ls="--", lw=1, label=f"perplexity +{100 * limit:g}%")
    ax.axhline(1.0, color="black", lw=0.5)
    # a broken edit (perplexity x9) would squeeze every useful point against the axis: cut the x axis
    # at 4x the constraint and mark the points beyond it at the edge
    right = max(4 * 100 * (limit if limit is not None else 0.1), 100 * chosen["values"]["ppl_increase"] * 1.5)
    beyond = [(x, y) for x, y in zip(xs, ys, strict=True) if x > right]
    if beyond:
        ax.scatter([right] * len(beyond), [y for _, y in beyond], marker=">", s=40, color="grey", clip_on=False)
        ax.annotate(
            f"{len(beyond)} trial(s) beyond +{right:.0f}%",
            (0.98, 0.02),
            xycoords="axes fraction",
            ha="right",
            fontsize=7,
            color="grey",
        )
        ax.set_xlim(min(min(xs), 0) - 1, right * 1.02)
    ax.set_xlabel("token perplexity increase on benign text (%)")
    ax.set_ylabel("undesired share / unedited's (mean over suites, metrics, judges)")
    ax.set_title(f"surgery tune: {result['settings']['model']}, {len(trials)} trials (tuning splits)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png.parent, png.name)
    plt.close(fig)


def tune(model: nn.Module, tokenizer, settings: TuneSettings, out_dir: str | Path, progress: bool = True) -> dict:
    """Search, then validate and write ``front.json``, ``front.png`` and ``chosen.yaml`` (see the module doc)."""
    from .evaluation import load_judges

    judges = load_judges(list(settings.judges), progress=False, data_dir=settings.data_dir)
    if settings.stack_on:
        from .adapter import ADAPTER_WEIGHTS
        from .provenance import file_sha256

        weights = Path(settings.stack_on) / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise SurgeryError(f"--stack-on {settings.stack_on}: not a surgery adapter folder (no {ADAPTER_WEIGHTS})")
        settings = dataclasses.replace(settings, stack_on_sha256=file_sha256(weights))
    tuner = Tuner(model, tokenizer, settings, out_dir, judges, progress)
    study = tuner.open_study()
    tuner.run(study)
    return tuner.finish(study)
