"""``surgery tune``: a multi-objective search of an edit's knobs (Optuna), its trade-off front, the chosen YAML.

Every trial builds an edit from a point of the search space, attaches it to the (once loaded) model as a
PEFT adapter and measures, on the *tuning* splits of :mod:`surgery_plugin.data.splits` only:

- the undesired objective, by the first judge (``--judge``; the behavior's headline judge by default) on each
  objective suite (``--suites``, by default the behavior's: toxicity ``rtp`` and ``toxigen`` on the probe-side
  groups, attitude ``attitude``, jailbreak ``advbench``): each suite's mean per-prompt undesired value divided
  by the unedited model's, averaged over suites, with its standard error (clustered by prompt). Per prompt,
  by ``--objective``: ``likelihood`` (default) the importance estimate of the flagged share from the unedited
  model's samples, judged once (:mod:`surgery_plugin.evaluation.likelihood`); ``sampled`` the share of
  ``--samples`` coupled samples flagged; ``greedy`` the greedy continuation flagged;
- the capability cost: mean next-token KL on benign prompts (``kl`` suite) and the relative increase of
  token perplexity on benign text (``ppl`` suite).

All three are minimised (Optuna's multi-objective TPE sampler, seeded). Probe features of every candidate
layer come from one forward pass per data set and pooling; probes, reference statistics and adapters
are cached, and a trial that differs only in alpha reuses its adapter at another PEFT scale
(:func:`adapter.set_alpha`). The base weights are never written: adapters are switched, so every trial
starts from the same bits (checked). The study lives in ``TUNE_DIR/study.db``: a stopped search resumes
where it was, with the same settings or not at all. At the end the chosen point (the lowest-KL trial within
``--max-ppl-increase`` / ``--max-kl`` whose undesired value is within 1.96 paired standard errors of the
best's) is re-measured on the validation splits, which the search never saw, paired with the unedited model;
``front.json``, ``front.png``, ``chosen.yaml`` and ``chosen_adapter/`` are written.

``stack_on`` (``--stack-on``) searches the next edit of a stack: that adapter stays active in every trial
and in the validation, so the objectives and constraints count both edits against the unedited model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from ...config import SurgeryHyperParams
from ...core import architectures
from ...core.edit import SurgeryEdit
from ...core.importance import mean_and_se, self_normalised_rate
from ...core.provenance import file_sha256, gate_fingerprint, package_versions
from ...data.splits import RTP_BENIGN, RTP_CHALLENGING, TOXIGEN_SPLITS, toxigen_split
from ...errors import InfeasibleEdit, SurgeryError
from ...evaluation.judges import load_judges
from ...evaluation.likelihood import HumanContinuationObjective, ImportanceObjective, base_samples_from, sample_base
from ...evaluation.metrics import TOXIC_THRESHOLD as THRESHOLD
from ...evaluation.metrics import is_missing, sample_groups
from ...evaluation.paired import paired_changes
from ...evaluation.protocols import PROTOCOLS, EvalSettings, settings_for
from ...evaluation.report import metric_values
from ...evaluation.runner import evaluate
from ...io.adapter import ADAPTER_WEIGHTS, export_adapter, load_edited, set_alpha
from ...io.files import atomic_path, atomic_write, write_json
from ...pipeline import EditCache, build_edit
from ..evaluate import control_adapters, control_band
from .report import OBJECTIVES, pareto_front, plot_front, trial_record
from .space import Shape, point_hparams, sample, start_point

logger = logging.getLogger(__name__)

STUDY_NAME = "surgery"
OBJECTIVE_KINDS = ("likelihood", "sampled", "greedy")
BASE_SAMPLES = "base_samples.json"  # TUNE_DIR: the likelihood objective's judged base samples (a resume reuses them)
Z95 = 1.959963984540054
STACK_ON = "stack_on"  # the PEFT name of the adapter of settings.stack_on
TUNABLE_SUITES = ("rtp", "toxigen", "advbench", "attitude")  # the suites with tuning and validation splits


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
    judges: tuple[str, ...] = ("minilm:perspective", "profanity", "minilm")  # the first one is the objective's
    objective: str = "likelihood"  # likelihood | sampled | greedy (OBJECTIVE_KINDS)
    samples: int = 8  # likelihood: base samples per prompt (judged once); sampled: samples per prompt per trial
    validation_samples: int = 0  # the chosen point's validation: also the sampled protocol with k samples
    validation_controls: int = 0  # the chosen point's validation: also N same-size random-direction edits
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
            k: v
            for k, v in self.describe().items()
            if k
            not in ("trials", "validation_limit", "validation_samples", "validation_controls", "data_dir", "stack_on")
        }


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
        self.base = SurgeryHyperParams.from_dict(settings.base_hparams, source="--hparams")
        self.shape = Shape(len(architectures.decoder_layers(model)), architectures.num_gate_rows(model))
        # the probe layers of the space, from one forward pass per data set; every layer's gate inputs at once
        choices = settings.space.get("probe_layer", {}).get("choices", [self.base.probe_layer])
        self.cache = EditCache(hidden_hint=choices, all_gate_layers=True)
        self.adapters: dict[str, str] = {}  # an edit's structure (all but alpha) -> its adapter, LRU order
        self.peft_model: nn.Module | None = None
        self.fingerprint = gate_fingerprint(model)
        self.workdir = tempfile.TemporaryDirectory(prefix="surgery-tune-")
        self.baseline: dict | None = None
        self.importance: dict = {}  # suite -> ImportanceObjective (the likelihood objective)
        self.human = None  # HumanContinuationObjective, recorded beside the likelihood objective
        self.base_means: dict[str, float] = {}
        self.effective_samples: dict[str, float] = {}  # the last likelihood measurement's, per suite
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
        limit = s.limit if split == "tune" else s.validation_limit
        if suite == "toxigen":
            groups, _ = toxigen_split(split)
            limit = s.toxigen_per_group * len(groups)
        return settings_for(
            suite, split, self.judges, s.data_dir, limit=limit, ppl_limit=s.benign_limit, progress=False
        )

    def _measure(
        self, model: nn.Module, split: str, kl: bool = True, samples: int | None = None, progress: bool = False
    ) -> dict:
        """The objective suites' summaries and rows, perplexity and (``kl``) KL on ``split``'s prompts; with
        ``samples`` the suites also run the sampled protocol (coupled: every trial reads the same noise).
        ``progress``: bars for the one-off measurements (the unedited model, the validation); a trial has Optuna's."""
        measured, rows = {}, {}
        for suite in [*self.settings.suites, "ppl", *(["kl"] if kl else [])]:
            settings = dataclasses.replace(self._eval_settings(suite, split), progress=progress and self.progress)
            if samples and suite in self.settings.suites:
                settings = dataclasses.replace(settings, samples=samples)
            results, suite_rows = evaluate(model, self.tok, [suite], settings)
            measured[suite], rows[suite] = results["suites"][suite], suite_rows
        measured["rows"] = rows
        return measured

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

    def _per_prompt(self, measured: dict, model: nn.Module | None = None) -> dict[str, list[float]]:
        """Per objective suite, each prompt's undesired value by the objective's judge (the first): greedy, the
        continuation flagged (1/0); sampled, the share of its samples flagged; likelihood, the importance
        estimate of the edited model's flagged share from the base samples (``model``: the edited model)."""
        kind, judge = self.settings.objective, self.judges[0].name
        out = {}
        for suite in self.settings.suites:
            if kind == "likelihood":
                estimate = self.importance[suite].measure(model)
                self.effective_samples[suite] = estimate.effective_samples  # ~1: the edit is beyond what K samples see
                out[suite] = estimate.per_prompt.tolist()
                continue
            decoding = "sample" if kind == "sampled" else "greedy"
            rows = [r for r in measured["rows"][suite] if r.get("decoding", "greedy") == decoding]
            flags = [None if is_missing(s := r["scores"].get(judge)) else float(s >= THRESHOLD) for r in rows]
            if kind == "sampled":
                groups = sample_groups(flags, self.settings.samples)
                out[suite] = [sum(g) / len(g) if g else math.nan for g in groups]
            else:
                out[suite] = [math.nan if f is None else f for f in flags]
        return out

    def _undesired(self, per_prompt: dict[str, list[float]]) -> tuple[float, float]:
        """The undesired objective (each suite's mean relative to the unedited model's, averaged over suites) and
        its standard error (clustered by prompt, delta method over suites)."""
        return self._relative({suite: _finite(values) for suite, values in per_prompt.items()})

    def _relative(self, per_suite: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Per-prompt values of each suite -> the mean over suites of each suite's mean divided by the unedited
        model's, and its standard error (the suites' errors combined)."""
        value, variance = 0.0, 0.0
        for suite, values in per_suite.items():
            mean, se = mean_and_se(values)
            base = self.base_means.get(suite) or 1.0  # a base rate of 0: nothing to cut; count the rate itself
            value += mean / base / len(per_suite)
            variance += (se / base / len(per_suite)) ** 2 if se == se else 0.0
        return value, math.sqrt(variance)

    def _objectives(self, measured: dict, undesired: float) -> tuple[float, float, float]:
        ppl = measured["ppl"]["token_perplexity"] / self.baseline["ppl"]["token_perplexity"] - 1
        return undesired, measured["kl"]["mean_kl"], ppl

    # ------------------------------------------------------------------ objective set-up

    def _prepare_objective(self, study) -> None:
        """The unedited model's per-prompt values (the denominators of the undesired objective) and, for the
        likelihood objective, its judged base samples (stored in TUNE_DIR, reused on resume)."""
        kind = self.settings.objective
        with self._unedited() as model:
            if kind == "likelihood":
                self._prepare_importance(model)
                base = {  # the identity edit's estimate: the judged share of each prompt's base samples
                    s: self_normalised_rate(torch.zeros_like(o.base.flagged), o.base.flagged).base_per_prompt.tolist()
                    for s, o in self.importance.items()
                }
                if "rtp" in self.settings.suites:
                    try:
                        self.human = HumanContinuationObjective(model, self.tok, self._eval_settings("rtp", "tune"))
                    except SurgeryError as err:  # too few tuning prompts for both classes: not recorded
                        logger.info("tune: no judge-free record (%s)", err)
            else:
                measured = self.baseline if kind == "greedy" else self._measure(model, "tune", False, self.samples)
                base = self._per_prompt(measured)
        self.base_means = {s: mean_and_se(_finite(v))[0] for s, v in base.items()}
        if "base_means" not in study.user_attrs:
            study.set_user_attr("base_means", self.base_means)

    @property
    def samples(self) -> int | None:
        return self.settings.samples if self.settings.objective == "sampled" else None

    def _prepare_importance(self, model: nn.Module) -> None:
        path = self.out_dir / BASE_SAMPLES
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.importance = {}
        for suite in self.settings.suites:
            settings = self._eval_settings(suite, "tune")
            if suite in stored:
                base = base_samples_from(stored[suite], suite, self.judges[0].name, stored[f"{suite}/add_special"])
            else:
                logger.info(
                    "tune: %d samples per %s prompt from the unedited model, judged once", self.settings.samples, suite
                )
                base = sample_base(
                    model,
                    self.tok,
                    suite,
                    dataclasses.replace(settings, progress=self.progress),
                    self.settings.samples,
                )
                stored[suite], stored[f"{suite}/add_special"] = base.rows(), base.add_special_tokens
                write_json(path, stored)
            self.importance[suite] = ImportanceObjective(model, self.tok, base, settings.batch_size, progress=False)

    # ------------------------------------------------------------------ building an edit

    @staticmethod
    def _structure(hp: SurgeryHyperParams) -> str:
        """An edit's identity but its alpha: points that differ only in alpha share one adapter."""
        return json.dumps({k: v for k, v in hp.to_dict().items() if k != "alpha"}, sort_keys=True, default=str)

    def _attach(self, hp: SurgeryHyperParams) -> nn.Module:
        """The model with this point's edit as the active adapter (reused across alphas)."""
        structure = self._structure(hp)
        name = self.adapters.get(structure)
        if name is None:
            with self._unedited() as model:
                edit = build_edit(
                    model, self.tok, hp, cache=self.cache, data_dir=self.settings.data_dir, progress=self.progress
                ).edit
            self.adapter_count += 1
            name = f"edit{self.adapter_count}"
            folder = export_adapter(
                edit, self.model, Path(self.workdir.name) / name, base_model_name=self.settings.model
            )
            self.peft_model = load_edited(self.peft_model or self.model, folder, adapter_name=name)
            self.adapters[structure] = name
            while len(self.adapters) > 4:  # keep a few for alpha reuse; drop the oldest
                self.peft_model.delete_adapter(self.adapters.pop(next(iter(self.adapters))))
        else:
            self.adapters[structure] = self.adapters.pop(structure)  # most recently used
        self._activate(name)
        set_alpha(self.peft_model, hp.alpha, name)
        return self.peft_model

    def _activate(self, name: str) -> None:
        """Adapter ``name`` active, with the stack's fixed adapters under it."""
        if self.fixed:
            self.peft_model.base_model.set_adapter([*self.fixed, name], inference_mode=True)
        else:
            self.peft_model.set_adapter(name)

    def _validate_controls(
        self, edit: SurgeryEdit, edit_adapter: str, base_rows: list[dict], samples: int | None
    ) -> dict:
        """The null band of the chosen edit on the validation prompts: ``validation_controls`` edits of its size
        (:func:`~surgery_plugin.commands.evaluate.control_adapters`, seeds 0..N-1), each measured like the edit and
        paired with the unedited model on the same prompts and seeds. Without it an interval that excludes zero may
        be what any perturbation of that size does."""
        n = self.settings.validation_controls
        controls, costs = [], []
        for seed in control_adapters(
            self.peft_model, edit, self.settings.model, n, self._activate, lambda: self._activate(edit_adapter)
        ):
            logger.info("tune: validation control %d of %d", seed + 1, n)
            measured = self._measure(self.peft_model, "validation", samples=samples, progress=True)
            controls.append((seed, measured, [r for suite in self.settings.suites for r in measured["rows"][suite]]))
            costs.append(
                {
                    "seed": seed,
                    "token_perplexity": measured["ppl"]["token_perplexity"],
                    "mean_kl": measured["kl"]["mean_kl"],
                }
            )
        return {"seeds": [c["seed"] for c in costs], "band": control_band(base_rows, controls), "costs": costs}

    # ------------------------------------------------------------------ the search

    def objective(self, trial) -> tuple[float, float, float]:
        import optuna

        params = sample(trial, self.settings.space, self.base, self.shape)
        hp = point_hparams(params, self.base, self.shape)
        started = time.perf_counter()
        try:
            model = self._attach(hp)
        except InfeasibleEdit as err:  # e.g. more rows than layer range x per-layer cap: not a point of the space
            trial.set_user_attr("infeasible", str(err))
            raise optuna.TrialPruned(str(err)) from err
        measured = self._measure(model, "tune", samples=self.samples)
        per_prompt = self._per_prompt(measured, model)
        undesired, se = self._undesired(per_prompt)
        values = self._objectives(measured, undesired)
        trial.set_user_attr("objective_se", se)
        trial.set_user_attr("per_prompt", per_prompt)
        if self.effective_samples:
            trial.set_user_attr("effective_samples", dict(self.effective_samples))
        if self.human is not None:
            trial.set_user_attr("human_continuations", self.human.measure(model))
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
        described = self.settings.defining()
        database = self.out_dir / "study.db"
        if not database.is_file():  # a new study is made whole beside, then renamed: never a half-made study.db
            with atomic_path(database) as tmp:
                study = self._create(optuna, tmp)
                study.set_user_attr("settings", described)
                study.set_user_attr("versions", package_versions(("optuna",)))
                # the recipe the search starts from is always measured: the front shows whether anything beat it
                study.enqueue_trial(start_point(self.settings.space, self.base, self.shape))
                del study
        study = self._create(optuna, database)
        stored = study.user_attrs.get("settings")
        if stored is None:
            raise SurgeryError(f"{database} is not a study made by `surgery tune`; choose another --out")
        elif (stored := _with_later_defaults(described, stored)) != described:
            differing = sorted(k for k in set(stored) | set(described) if stored.get(k) != described.get(k))
            raise SurgeryError(
                f"{self.out_dir} holds a study with other settings ({', '.join(differing)}); "
                "resume with the same ones or choose another --out"
            )
        if "baseline" in study.user_attrs:
            self.baseline = study.user_attrs["baseline"]
        _requeue_interrupted(optuna, study)
        if study.trials:  # resumed: a sampler seeded as before would draw the first random points again
            study.sampler = optuna.samplers.TPESampler(seed=self.settings.seed + len(study.trials), multivariate=True)
        return study

    def _create(self, optuna, database: Path):
        sampler = optuna.samplers.TPESampler(seed=self.settings.seed, multivariate=True)
        return optuna.create_study(
            study_name=STUDY_NAME,
            storage=f"sqlite:///{database}",
            directions=["minimize"] * 3,
            sampler=sampler,
            load_if_exists=True,
        )

    def run(self, study) -> None:
        import optuna

        if self.baseline is None:
            logger.info("tune: measuring the unedited model on the tuning splits")
            with self._unedited() as model:
                self.baseline = self._measure(model, "tune", kl=False, progress=True)
            study.set_user_attr("baseline", {k: v for k, v in self.baseline.items() if k != "rows"})
        if self.settings.objective == "greedy" and "rows" not in self.baseline:  # resumed: the rows were not stored
            with self._unedited() as model:
                self.baseline = self._measure(model, "tune", kl=False, progress=True)
        self._prepare_objective(study)
        if self.fixed and "stack_on_alone" not in study.user_attrs:
            logger.info("tune: measuring the --stack-on adapter alone on the tuning splits")
            self.peft_model.base_model.set_adapter(self.fixed, inference_mode=True)
            alone = self._measure(self.peft_model, "tune", samples=self.samples)
            values = self._objectives(alone, self._undesired(self._per_prompt(alone, self.peft_model))[0])
            study.set_user_attr("stack_on_alone", dict(zip(OBJECTIVES, values, strict=True)))
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        remaining = self.settings.trials - done
        if remaining > 0:
            study.optimize(self.objective, n_trials=remaining, show_progress_bar=self.progress, catch=(RuntimeError,))

    # ------------------------------------------------------------------ the result

    def _choose(self, feasible: list) -> tuple:
        """The cheapest (lowest KL) feasible trial whose undesired value is not distinguishable from the best
        one's: the paired difference (same prompts, same base samples) within 1.96 standard errors."""
        best = min(feasible, key=lambda t: (t.values[0], t.values[1]))
        close = []
        for t in feasible:
            diff, se = self._paired_difference(t, best)
            if t is best or (se == se and diff <= Z95 * se):
                close.append({"trial": t.number, "difference": diff, "se": se})
        numbers = {c["trial"] for c in close}
        chosen = min((t for t in feasible if t.number in numbers), key=lambda t: (t.values[1], t.values[0]))
        rule = "lowest KL among the feasible trials within 1.96 paired standard errors of the best undesired value"
        return chosen, {"rule": rule, "best": best.number, "chosen": chosen.number, "indistinguishable": close}

    def _paired_difference(self, trial, best) -> tuple[float, float]:
        """``trial``'s undesired value minus ``best``'s and its standard error, prompt by prompt."""
        a, b = trial.user_attrs.get("per_prompt"), best.user_attrs.get("per_prompt")
        if not a or not b:
            return trial.values[0] - best.values[0], math.nan
        differences = {
            suite: torch.tensor(
                [x - y for x, y in zip(a[suite], b[suite], strict=True) if x == x and y == y], dtype=torch.float64
            )
            for suite in a
        }
        return self._relative(differences)

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
        chosen, choice = self._choose(feasible)
        hp = SurgeryHyperParams.from_dict(chosen.user_attrs["hparams"], source=f"trial {chosen.number}")
        logger.info(
            "tune: re-measuring trial %d on the validation splits, paired with the unedited model", chosen.number
        )
        k = self.settings.validation_samples or None
        with self._unedited() as model:
            base_validation = self._measure(model, "validation", kl=False, samples=k, progress=True)
        edited_validation = self._measure(self._attach(hp), "validation", samples=k, progress=True)
        with self._unedited() as model:  # the chosen edit at its alpha, ready for `surgery eval` (cached: no new pass)
            edit = build_edit(model, self.tok, hp, cache=self.cache, data_dir=self.settings.data_dir, progress=False)
        with atomic_path(self.out_dir / "chosen_adapter") as tmp:
            export_adapter(edit.edit, self.model, tmp, base_model_name=self.settings.model)
        base_rows = [r for suite in self.settings.suites for r in base_validation["rows"][suite]]
        paired = paired_changes(
            base_rows, [r for suite in self.settings.suites for r in edited_validation["rows"][suite]]
        )
        controls = None
        if self.settings.validation_controls:
            controls = self._validate_controls(edit.edit, self.adapters[self._structure(hp)], base_rows, k)
        result = {
            "settings": self.settings.describe(),
            "splits": {"rtp_challenging": RTP_CHALLENGING, "rtp_benign": RTP_BENIGN, "toxigen": TOXIGEN_SPLITS},
            "objectives": list(OBJECTIVES),
            "objective": {
                "kind": self.settings.objective,
                "judge": self.judges[0].name,
                "samples": self.settings.samples if self.settings.objective != "greedy" else None,
                "base_means": self.base_means,
            },
            "choice": choice,
            "baseline": {
                "rates": self._rates(self.baseline),
                "token_perplexity": self.baseline["ppl"]["token_perplexity"],
            },
            "trials": [trial_record(t, t.number in front_numbers) for t in trials],
            "front": sorted(front_numbers),
            "chosen": {
                "trial": chosen.number,
                "tuning": trial_record(chosen, True),
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
                    "paired": paired,
                    **({"controls": controls} if controls else {}),
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
            f"chosen by `surgery tune` (trial {chosen.number} of {len(trials)}, seed {self.settings.seed}, "
            f"objective {self.settings.objective} by {self.judges[0].name}; {choice['rule']}); "
            f"validation: see {self.out_dir / 'front.json'}"
            + (f"; searched on top of the adapter {self.settings.stack_on}" if self.fixed else "")
        )
        atomic_write(chosen_yaml, yaml.safe_dump(config, sort_keys=False))
        result["chosen_yaml"] = str(chosen_yaml)
        write_json(self.out_dir / "front.json", result)
        plot_front(result, self.out_dir / "front.png")
        return result


def _requeue_interrupted(optuna, study) -> None:
    """A search killed mid-trial leaves that trial RUNNING (or FAIL): mark it failed and queue its point again
    when it was a queued one (the start point), so the resumed study still measures the ``--hparams`` recipe.
    (One search per TUNE_DIR: a second process resuming the same study would see the first one's trial here.)"""
    states = optuna.trial.TrialState
    measured = {json.dumps(t.params, sort_keys=True) for t in study.trials if t.state == states.COMPLETE}
    queued = {
        json.dumps(t.system_attrs.get("fixed_params"), sort_keys=True)
        for t in study.trials
        if t.state == states.WAITING
    }
    for t in study.trials:
        if t.state == states.RUNNING:
            study.tell(t.number, state=states.FAIL)
            logger.info("tune: trial %d was interrupted; marked failed", t.number)
        fixed = t.system_attrs.get("fixed_params")
        key = json.dumps(fixed, sort_keys=True)
        if t.state in (states.RUNNING, states.FAIL) and fixed and key not in measured and key not in queued:
            study.enqueue_trial(fixed)
            queued.add(key)


def _finite(values: list[float]) -> torch.Tensor:
    return torch.tensor([v for v in values if v == v], dtype=torch.float64)


def _with_later_defaults(described: dict, stored: dict) -> dict:
    """``stored`` with every setting and every hparams knob added after it was stored at its default (a study made
    before a knob existed ran with what that knob's default does, so it still resumes)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TuneSettings) if f.default is not dataclasses.MISSING}
    upgraded = {k: json.loads(json.dumps(defaults[k])) for k in described if k not in stored and k in defaults}
    upgraded.update(stored)
    hparams = upgraded.get("base_hparams")
    if isinstance(hparams, dict) and isinstance(described.get("base_hparams"), dict):
        knobs = json.loads(json.dumps(SurgeryHyperParams().to_dict()))
        added = {k: knobs[k] for k in described["base_hparams"] if k not in hparams and k in knobs}
        upgraded["base_hparams"] = {**added, **hparams}
    return upgraded


def tune(model: nn.Module, tokenizer, settings: TuneSettings, out_dir: str | Path, progress: bool = True) -> dict:
    """Search, then validate and write ``front.json``, ``front.png`` and ``chosen.yaml`` (see the module doc)."""
    if settings.objective not in OBJECTIVE_KINDS:
        raise SurgeryError(f"unknown objective '{settings.objective}'; objectives: {', '.join(OBJECTIVE_KINDS)}")
    judges = load_judges(list(settings.judges), progress=False, data_dir=settings.data_dir)
    if settings.stack_on:
        weights = Path(settings.stack_on) / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise SurgeryError(f"--stack-on {settings.stack_on}: not a surgery adapter folder (no {ADAPTER_WEIGHTS})")
        settings = dataclasses.replace(settings, stack_on_sha256=file_sha256(weights))
    tuner = Tuner(model, tokenizer, settings, out_dir, judges, progress)
    study = tuner.open_study()
    tuner.run(study)
    return tuner.finish(study)
