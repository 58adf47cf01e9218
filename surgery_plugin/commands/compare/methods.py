"""``surgery compare``: Surgery against EasyEdit's DINM, ROME, FT-L, FT-M and a safety prompt, on one model,
the same edit records, prompts and judges. Writes ``RUN_DIR/compare.json``, ``compare.md`` (the table) and
``tradeoff.png`` (toxic rate against capability cost).

Rows (``compare.json["methods"]``), each edited from the unedited model:

| row | method | the edit |
|---|---|---|
| ``unedited`` | (always) | none |
| ``prompt`` | prompt | none: a safety instruction read first (a system turn for chat models) |
| ``surgery-records`` | surgery | probe from the N edit records only (EasyEdit's request path, ``probe_data: null``) |
| ``surgery-shipped`` | surgery | the shipped YAML's probe (Davidson); its alpha curve comes from ``set_alpha`` |
| ``steering`` | steering | no weight change: minus the same probe's direction added at the probe layer's input; its
  strength chosen on the tuning split under Surgery's perplexity constraint |
| ``ablation`` | ablation | the same probe's direction projected out of every attention and MLP output projection
  (the abliteration recipe), rank one per matrix |
| ``dinm``, ``rome``, ``ft-l``, ``ft-m`` | same | EasyEdit's algorithm through its editor (see .easyedit.baselines) |

Two editing protocols (:data:`.evaluation.protocols.EDIT_PROTOCOLS`): the *global edit* gets SafeEdit
records [0, N) applied one after another into one model (Surgery: one probe from all N), saved
under ``edits/<row>/``, reloaded from there, then judged on rtp / toxigen / advbench / ppl / kl; the
*SafeEdit per instance* protocol edits each of records [60, 60+N) (the report split) alone, generates that record's
five inputs and restores. Costs are measured in the same run: wall time and peak RSS of the global
edit, changed weights, size of the saved edit. A row that fails is recorded with its error; the
others still run, and nothing of the failed row stays on disk.

Every row's generations are compared with the unedited row's prompt by prompt (``paired``: each change with its
95% interval); with ``controls`` the changes that same-size random-direction Surgery edits make on the same
prompts are the null band printed beside them. Toxicity suites are judged by ``judges``, the safeedit (and
advbench) suites by ``safety_judges``, which judge compliance with the harmful request.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...config import SurgeryHyperParams, find_hparams
from ...core import architectures
from ...core.architectures import ModelGates
from ...core.edit import apply_edit, revert_edit
from ...core.features import mean_token_norm
from ...core.provenance import package_versions, utc_now
from ...core.steering import added_direction, apply_ablation, unit_vector
from ...data.loaders import load_benign_documents, load_safeedit, safeedit_requests
from ...data.paths import resolve_data_dir
from ...data.splits import SAFEEDIT
from ...errors import SurgeryError, first_line
from ...evaluation.arms import ArmStore, read_arm, store_folder
from ...evaluation.generation import next_token_logprobs
from ...evaluation.judges import judge_info, load_judges
from ...evaluation.paired import paired_changes
from ...evaluation.protocols import EDIT_PROTOCOLS, GLOBAL_EDIT, PROTOCOLS, EvalSettings, settings_for
from ...evaluation.report import metric_values
from ...evaluation.runner import SCHEMA_VERSION, evaluate, write_run, write_run_files
from ...evaluation.suites import run_safeedit_per_instance
from ...io.adapter import load_edited, set_alpha, write_adapter
from ...io.files import check_target, json_text, output
from ...io.saved_edits import (
    adapter_changed_params,
    changed_params,
    folder_bytes,
    load_saved_edit,
    save_low_rank_edit,
    save_prompt_edit,
    save_steering,
    save_tensors_edit,
)
from ...models import load_model
from ...pipeline import build_edit, build_probe
from .config import (
    NO_CHANGE_BELOW,
    PROBE_METHODS,
    RELOAD_CHECK_PROMPTS,
    CompareConfig,
    parse_compare_suites,
    parse_methods,
    require_easyedit,
)
from .meter import measure, trim_memory
from .report import write_outputs
from .reuse import check_sources, finished_output_row

SAFETY_SUITES = ("safeedit", "advbench")  # judged by the safety judges: compliance, not toxic language

logger = logging.getLogger(__name__)

# where no scale of the grid keeps perplexity within the budget (Gemma 3: its mean residual norm, the grid's unit,
# is dominated by a few huge activations, and 0.03 of it is +690% perplexity), the weakest is halved until one does
STEERING_HALVINGS = 8
STEERING_BELOW_GRID = f"the weakest scale halved until within the perplexity budget, at most {STEERING_HALVINGS} times"


def search_steering_scale(
    measure_scale: Callable[[float], dict], grid: tuple[float, ...], max_perplexity: float, judge: str
) -> tuple[list[dict], dict]:
    """Every scale of ``grid``, measured by ``measure_scale`` (``{"toxic_rate": {judge: r}, "token_perplexity":
    p}``), then, if none keeps perplexity at most ``max_perplexity``, the weakest halved until one does
    (:data:`STEERING_HALVINGS` at most). Chosen: the lowest toxic rate among those that do (ties: the weaker),
    else the weakest measured. Returns ``(points, chosen)``, each point with its ``scale`` and ``feasible``."""

    def point(scale: float) -> dict:
        measured = measure_scale(scale)
        return {"scale": scale, **measured, "feasible": measured["token_perplexity"] <= max_perplexity}

    points = [point(scale) for scale in grid]
    scale = min(grid)
    for _ in range(STEERING_HALVINGS):
        if any(p["feasible"] for p in points):
            break
        scale /= 2
        points.append(point(scale))
    feasible = [p for p in points if p["feasible"]]
    if feasible:
        return points, min(feasible, key=lambda p: (p["toxic_rate"][judge], p["scale"]))
    return points, min(points, key=lambda p: p["scale"])


def _logits(model: nn.Module, tok, prompts: list[str]) -> torch.Tensor:
    return next_token_logprobs(model, tok, prompts, progress=False)


@dataclass
class _Row:
    name: str
    label: str
    method: str
    description: str
    result: dict = field(default_factory=dict)


class Comparison:
    """One ``surgery compare`` run; :meth:`run` does everything and returns ``compare.json``'s dict."""

    def __init__(self, config: CompareConfig):
        self.config = config
        self.methods = parse_methods(config.methods)
        self.suites = parse_compare_suites(config.suites)
        if config.records < 1:
            raise SurgeryError(f"--records must be >= 1, got {config.records}")
        require_easyedit(self.methods)
        self.target = check_target(config.out, "compare", config.overwrite)  # before any work: bad targets fail now
        self.out = self.target  # while running: the temp folder the comparison is written into
        self.data_dir = resolve_data_dir(config.data_dir)  # absolute: EasyEdit's editors are built in another cwd
        self.records = load_safeedit(self.data_dir)
        n = config.records
        self.instance_start = SAFEEDIT["report"][0]  # the records no probe (jailbreak's included) uses
        if n > self.instance_start or self.instance_start + n > len(self.records):
            raise SurgeryError(
                f"--records {n} needs records [0, {n}) to edit and [{self.instance_start}, {self.instance_start + n}) "
                f"for the per-instance protocol; there are {len(self.records)} SafeEdit records"
            )
        self.edit_records = self.records[:n]
        self.global_suites = [s for s in self.suites if s in GLOBAL_EDIT.suites]
        self.instance = "safeedit" in self.suites
        stray = sorted(set(config.overrides) - set(self.methods))
        if stray:
            raise SurgeryError(f"--set for '{stray[0]}', which is not among --methods {','.join(self.methods)}")
        if "prompt" in config.overrides:
            raise SurgeryError("the prompt method has no hyperparameters; use --instruction")
        for method in ("steering", "ablation"):
            if method in config.overrides:
                raise SurgeryError(f"{method} uses Surgery's probe: set its hyperparameters with --set surgery.KEY")
        if not config.steering_scales or not all(x > 0 for x in config.steering_scales):
            raise SurgeryError(f"steering scales must be positive, got {list(config.steering_scales)}")
        # the model's Surgery YAML is read whether or not this run has a probe row: it is in every row's
        # fingerprint, so a part with EasyEdit's baselines alone merges (--reuse) with a part with Surgery's rows;
        # only a run with a probe row needs it (no YAML, or a bad one, is an error there)
        probe_rows = bool(set(self.methods) & set(PROBE_METHODS))
        try:
            path = find_hparams(config.model, "Surgery", config.hparams_dir)
            hp = SurgeryHyperParams.from_hparams(path)
        except SurgeryError:
            if probe_rows:
                raise
            hp = None
        if hp is not None and config.overrides.get("surgery"):  # only with the surgery method (checked above)
            hp = SurgeryHyperParams.from_dict({**hp.to_dict(), **config.overrides["surgery"]}, f"{path} + --set")
        self.surgery_hparams = hp if probe_rows else None
        self.identity_surgery_hparams = hp.to_dict() if hp is not None else None
        # every baseline's YAML read (by EasyEdit's own class) before anything runs: a bad one is bad input
        from ...integrations.easyedit.baselines import BASELINES, load_hparams

        self.baseline_hparams = {
            m: load_hparams(BASELINES[m], config.model, config.hparams_dir, config.overrides.get(m), config.device)
            for m in self.methods
            if m in BASELINES
        }
        self.judges = load_judges(config.judges, data_dir=self.data_dir, progress=config.progress)
        self.safety_judges = (
            load_judges(config.safety_judges, data_dir=self.data_dir, progress=config.progress)
            if set(self.suites) & set(SAFETY_SUITES)
            else []
        )
        self.control_band: dict | None = None
        self.row_samples: dict[str, list[dict]] = {}  # each row's generations, for the comparison with Surgery
        kl = self.settings("kl")
        self.benign_prompts = [
            d["prompt"] for d in load_benign_documents(self.data_dir, limit=kl.ppl_limit, start=kl.benign_start)
        ]
        self.kl_reference: torch.Tensor | None = None
        # each finished row kept beside --out: the same command resumes an interrupted comparison
        self.store = ArmStore(
            self.target,
            self._identity(),
            {
                **{m: {"hparams": dataclasses.asdict(hp)} for m, hp in self.baseline_hparams.items()},
                "steering": {"below_grid": STEERING_BELOW_GRID},  # a steering row chosen without it is measured again
            },
        )
        self.resumed: list[str] = []
        self.reuse_from = check_sources(tuple(config.reuse), self.target)
        self.reused: dict[str, str] = {}  # row -> the --reuse run it was taken from
        self.not_measured: list[str] = []  # --reuse-only: the rows no run had finished, left out

    def _identity(self) -> dict:
        """What every row of this comparison depends on besides its own name and, for EasyEdit's baselines, their
        own hyperparameters (given to the store per arm: a run with one more method reuses the others' rows)."""
        shared = {
            k: v
            for k, v in self.config.describe().items()
            if k not in ("out", "overwrite", "progress", "command", "methods", "reuse", "reuse_only")
        }
        return {
            **shared,
            "data_dir": str(self.data_dir),
            "surgery_hparams": self.identity_surgery_hparams,
            "judges": [j.name for j in self.judges],
            "safety_judges": [j.name for j in self.safety_judges],
            "version": package_versions()["surgery_plugin"],
        }

    # ------------------------------------------------------------------ settings per suite

    def settings(self, suite: str, split: str = "report", **changes) -> EvalSettings:
        """``suite`` on its report split (data/splits.py): no probe, search or validation saw those prompts. The
        sampled protocol too where ``samples`` is set (rtp, toxigen); the safety judges for safeedit and advbench."""
        c = self.config
        options = dict(
            limit=c.records if suite == "safeedit" else c.limit,
            ppl_limit=c.ppl_limit,
            batch_size=c.batch_size,
            max_new_tokens=c.max_new_tokens,
            seed=c.seed,
            progress=c.progress,
        )
        if suite in c.sample_suites and c.samples:
            options.update(samples=c.samples, sample_limit=c.sample_limit)
        judges = self.safety_judges if suite in SAFETY_SUITES else self.judges
        return settings_for(suite, split, judges, self.data_dir, **{**options, **changes})

    def evaluate_global(
        self,
        row: _Row,
        model: nn.Module,
        tok,
        adapter: bool,
        instruction: str | None = None,
        suites=None,
        sampled: bool = True,
    ) -> tuple[dict, list[dict]]:
        """The global-edit suites on ``model``; KL against the unedited log-probs, or the adapter switched off.
        ``sampled=False``: greedy only (the alpha curve)."""
        results: dict = {"suites": {}, "timing_s": {}}
        samples: list[dict] = []
        names = list(suites if suites is not None else self.global_suites)
        for suite in tqdm(names, desc=f"{row.name}: suites", unit="suite", disable=not self.config.progress):
            settings = self.settings(
                suite,
                instruction=instruction,
                kl_reference=None if adapter else self.kl_reference,
                **({} if sampled else {"samples": None}),
            )
            res, rows = evaluate(model, tok, [suite], settings)
            results["suites"][suite] = res["suites"][suite]
            results["timing_s"][suite] = res["timing_s"][suite]
            samples += rows
        return results, samples

    def evaluate_instances(
        self, model: nn.Module, tok, edit: Callable[[dict], Callable[[], None]], instruction: str | None = None
    ) -> tuple[dict, list[dict]]:
        return run_safeedit_per_instance(model, tok, self.settings("safeedit", instruction=instruction), edit)

    def evaluate_fixed_instances(
        self, model: nn.Module, tok, instruction: str | None = None
    ) -> tuple[dict, list[dict]]:
        """The per-instance protocol for a row whose edit does not depend on the record (none, a prompt, a global
        edit): the same model on each record's inputs, nothing edited per record."""
        summary, rows = self.evaluate_instances(model, tok, lambda record: lambda: None, instruction)
        summary["edit_seconds_mean"] = None
        return summary, rows

    # ------------------------------------------------------------------ the run

    def rows(self) -> list[_Row]:
        from ...integrations.easyedit.baselines import BASELINES

        n = self.config.records
        rows = [_Row("unedited", "unedited", "", "the model as loaded")]
        # the rows that use the unedited model first: it is freed before the edits are measured
        for method in sorted(self.methods, key=lambda m: m != "prompt"):
            if method == "prompt":
                rows.append(
                    _Row(
                        "prompt",
                        "prompt (safety system prompt)",
                        "prompt",
                        "no weight change: a safety instruction before every prompt (a system turn for chat "
                        "models, else a text prefix); ppl and KL are measured with it",
                    )
                )
            elif method == "surgery":
                # as shipped first: the row a stopped run most needs (its controls give every row its band)
                rows.append(
                    _Row(
                        "surgery-shipped",
                        "surgery (shipped probe)",
                        "surgery",
                        f"Model Surgery as shipped (probe_data: {self.surgery_hparams.probe_data}, the YAML's "
                        "probe); edit records unused; the alpha curve of the plot rescales this edit",
                    )
                )
                rows.append(
                    _Row(
                        "surgery-records",
                        f"surgery (probe: the {n} edit records)",
                        "surgery",
                        f"Model Surgery with the shipped YAML, but its probe built from the same {n} SafeEdit "
                        "records the baselines edit with (EasyEdit's request path: prompt + safe generation "
                        "acceptable, prompt + unsafe generation undesired; probe_data: null)",
                    )
                )
            elif method == "steering":
                rows.append(
                    _Row(
                        "steering",
                        "steering (shipped probe)",
                        "steering",
                        "no weight change: activation addition at inference, minus the shipped YAML's probe "
                        f"direction added at the input of decoder layer {self.surgery_hparams.probe_layer} (the probe "
                        "layer), every position; its strength (a fraction of the mean residual norm there) chosen on "
                        f"the tuning split: the lowest toxic rate within +{self.config.max_ppl_increase:.0%} "
                        "perplexity, Surgery's search constraint",
                    )
                )
            elif method == "ablation":
                rows.append(
                    _Row(
                        "ablation",
                        "directional ablation (shipped probe)",
                        "ablation",
                        "the shipped YAML's probe direction projected out of every attention output and MLP down "
                        "projection (the abliteration recipe: nothing a layer writes into the residual stream has "
                        "a component along it); rank one per matrix, no knob",
                    )
                )
            else:
                b = BASELINES[method]
                without_stats = method == "rome" and not self.baseline_hparams[method].mom2_adjustment
                label = f"{method} (no covariance stats)" if without_stats else method
                rows.append(_Row(method, label, method, b.description))
        return rows

    def run(self) -> dict:
        """Every row, written into a temp folder that replaces ``--out`` whole at the end; rows an interrupted run
        of this comparison finished are read back from its store (:mod:`surgery_plugin.evaluation.arms`)."""
        with output(self.target, "compare", self.config.overwrite) as tmp:
            self.out = tmp
            try:
                result = self._run_rows()
            finally:
                self.out = self.target
        if not self.config.reuse_only:  # a partial look keeps the rows for the run that finishes the comparison
            self.store.discard()
        return result

    # the folders a row writes under the output, each restored with it
    ROW_FOLDERS = ("edits", "runs", "easyedit")

    @classmethod
    def _write_row(cls, folder: Path, name: str, result: dict, samples: list[dict], band: dict | None, root: Path):
        """A row's folder in the store: its result, its generations, the control band it measured (if it measured
        one) and its folders under ``root`` (the run's output)."""
        write_run_files(folder, result, samples, report=False)
        if result.get("controls") and band is not None:
            (folder / "control_band.json").write_text(json_text(band), encoding="utf-8")
        for sub in cls.ROW_FOLDERS:
            if (root / sub / name).exists():
                shutil.copytree(root / sub / name, folder / sub)

    def _keep(self, row: _Row) -> None:
        """Keep a finished row (its result, its generations, its folders, the control band it measured)."""
        samples = self.row_samples.get(row.name, [])
        try:
            self.store.keep(
                row.name, lambda tmp: self._write_row(tmp, row.name, row.result, samples, self.control_band, self.out)
            )
        except (OSError, SurgeryError) as err:  # the row itself is measured: losing only the resume must not lose it
            logger.warning("compare: %s could not be kept for a resume (%s)", row.name, first_line(err))

    def _reuse(self, row: _Row) -> bool:
        """Whether a ``--reuse`` run finished ``row`` with this run's fingerprint: then it is copied into this run's
        store (from that run's store, else from its output) and read back from there like a resumed row."""
        key = self.store.key(row.name)
        for run in self.reuse_from:
            try:
                taken = self.store.adopt(row.name, store_folder(run))
                found = None if taken else finished_output_row(run, row.name, key)
                if found is not None:
                    result, samples, band = found
                    write = partial(
                        self._write_row, name=row.name, result=result, samples=samples, band=band, root=run
                    )
                    self.store.keep(row.name, write)
                    taken = True
            except (OSError, SurgeryError) as err:  # a part that cannot be copied is a row to measure, not a failure
                logger.warning("compare: %s could not be taken from %s (%s)", row.name, run, first_line(err))
                taken = False
            if taken:
                logger.info("compare: %s taken from %s", row.label, run)
                self.reused[row.name] = str(run)
                return True
        return False

    def _restore(self, row: _Row) -> bool:
        """Whether the store held ``row`` finished by an interrupted run of this comparison (then it is back)."""
        folder = self.store.finished(row.name)
        if folder is None:
            return False
        try:
            result, samples = read_arm(folder)
            band = folder / "control_band.json"
            control_band = json.loads(band.read_text(encoding="utf-8")) if band.exists() else None
            for sub in self.ROW_FOLDERS:
                if (folder / sub).exists():
                    shutil.copytree(folder / sub, self.out / sub / row.name)
        except (OSError, ValueError) as err:
            logger.info("compare: %s's kept row is unreadable (%s); running it again", row.name, err)
            for sub in self.ROW_FOLDERS:
                shutil.rmtree(self.out / sub / row.name, ignore_errors=True)
            return False
        row.result = result
        self.row_samples[row.name] = samples
        if control_band is not None:
            self.control_band = control_band
        self.resumed.append(row.name)
        return True

    def _run_row(self, row: _Row, base_model, base_tok) -> None:
        if row.name in ("unedited", "prompt"):
            self._run_unedited(row, base_model, base_tok)
        elif row.name == "surgery-records":
            self._run_surgery(row, from_records=True)
        elif row.name == "surgery-shipped":
            self._run_surgery(row, from_records=False)
        elif row.name == "steering":
            self._run_steering(row)
        elif row.name == "ablation":
            self._run_ablation(row)
        else:
            self._run_baseline(row)

    def _run_rows(self) -> dict:
        started = time.perf_counter()
        torch.manual_seed(self.config.seed)
        rows = self.rows()
        if self.config.reuse_only:  # nothing is measured: no model
            base_model = base_tok = None
        else:
            base_model, base_tok = load_model(self.config.model, device=self.config.device)
            self.kl_reference = next_token_logprobs(
                base_model, base_tok, self.benign_prompts, self.config.batch_size, desc="kl: unedited reference"
            )
        self.reload_prompts = self.benign_prompts[:RELOAD_CHECK_PROMPTS]
        for row in tqdm(rows, desc="compare", unit="method", disable=not self.config.progress):
            logger.info("compare: %s", row.label)
            torch.manual_seed(self.config.seed)
            if row.name not in ("unedited", "prompt"):
                base_model = base_tok = None  # every edit loads its own copy
            if self._restore(row) or (self.reuse_from and self._reuse(row) and self._restore(row)):
                continue
            if self.config.reuse_only:  # no run finished it: left out, named in settings["not_measured"]
                self.not_measured.append(row.name)
                continue
            try:
                with self.store.journal(row.name):  # a row stopped mid-way resumes from its last generated batch
                    self._run_row(row, base_model, base_tok)
                row.result["status"] = "ok"
                self._keep(row)
            except Exception as err:  # one failed method must not stop the others
                if row.name == "unedited":
                    raise
                logger.error("compare: %s failed: %s", row.name, first_line(err))
                logger.debug("compare: %s failed", row.name, exc_info=True)
                for folder in (self.out / "edits" / row.name, self.out / "runs" / row.name):
                    shutil.rmtree(folder, ignore_errors=True)
                row.result = {"status": "failed", "error": first_line(err), "suites": {}, "cost": None}
            finally:
                trim_memory()
        if "unedited" in self.not_measured:
            raise SurgeryError(
                "--reuse-only: no --reuse run has finished the unedited row yet, and every change is paired with it"
            )
        rows = [r for r in rows if r.name not in self.not_measured]
        if self.control_band:  # the null band beside every row's paired changes
            for r in rows:
                if "suites" in r.result.get("paired", {}):
                    r.result["paired"]["controls"] = self.control_band
        surgery = self.row_samples.get("surgery-shipped")
        for r in rows:  # every other method against Surgery as shipped, prompt by prompt: "equal effect"
            if surgery is not None and r.name not in ("unedited", "surgery-shipped") and r.name in self.row_samples:
                try:
                    r.result["vs_surgery"] = paired_changes(surgery, self.row_samples[r.name])
                except ValueError as err:
                    r.result["vs_surgery"] = {"error": str(err)}
        result = {
            "methods": {
                r.name: {
                    "status": r.result["status"],
                    "error": r.result.get("error"),
                    "label": r.label,
                    "method": r.method,
                    "description": r.description,
                    "suites": r.result.get("suites", {}),
                    "cost": r.result.get("cost"),
                    **{k: v for k, v in r.result.items() if k not in ("status", "error", "suites", "cost")},
                    "fingerprint": self.store.key(r.name),  # what --reuse matches a row of this run by
                }
                for r in rows
            },
            "settings": self._settings(time.perf_counter() - started),
        }
        write_outputs(self.out, result)
        return result

    def _settings(self, seconds: float) -> dict:
        c, n = self.config, self.config.records
        return {
            **c.describe(),
            "methods": list(self.methods),
            "suites": list(self.suites),
            "data_dir": str(self.data_dir) if self.data_dir else None,
            "protocols": {p.name: dataclasses.asdict(p) for p in EDIT_PROTOCOLS.values()},
            "edit_records": {"range": f"safeedit[0:{n}]", "ids": [r.get("id") for r in self.edit_records]},
            "instance_records": {
                "range": f"safeedit[{self.instance_start}:{self.instance_start + n}]",
                "ids": [r.get("id") for r in self.records[self.instance_start : self.instance_start + n]],
            },
            # each suite's report split (data/splits.py), as settings_for made it
            "prompts": {suite: self.settings(suite).describe() for suite in self.global_suites},
            "surgery_hparams": self.surgery_hparams.to_dict() if self.surgery_hparams else None,
            "judges": [j.name for j in self.judges],
            "safety_judges": [j.name for j in self.safety_judges],
            "judge_info": {j.name: judge_info(j) for j in [*self.judges, *self.safety_judges]},
            "torch_threads": torch.get_num_threads(),
            "seconds": round(seconds, 1),
            # rows an interrupted run of this comparison had finished (their costs are that run's)
            "resumed_rows": [name for name in self.resumed if name not in self.reused],
            # rows taken from the --reuse runs, by the run each came from (their costs are that run's)
            "reused_rows": dict(self.reused),
            "not_measured": list(self.not_measured),
            "created": utc_now(),
            "versions": package_versions(("lm_eval", "easyeditor")),
        }

    # ------------------------------------------------------------------ rows

    def _finish(self, row: _Row, results: dict, samples: list[dict]) -> None:
        row.result["suites"] = results["suites"]
        self.row_samples[row.name] = samples
        unedited = self.row_samples.get("unedited")
        if row.name != "unedited" and unedited is not None:
            try:  # the same prompts, in the same order, as the unedited row: compared prompt by prompt
                row.result["paired"] = paired_changes(unedited, samples)
            except ValueError as err:
                row.result["paired"] = {"error": str(err)}
        write_run(
            self.out / "runs" / row.name,
            {
                "schema_version": SCHEMA_VERSION,
                "model": self.config.model,
                "method": row.name,
                "judges": [j.name for j in self.judges],
                "judge_info": {},
                "settings": self.settings("rtp").describe(),
                **results,
                **{k: v for k, v in row.result.items() if k in ("cost", "edit", "curve")},
            },
            samples,
            report=False,
        )

    def _run_unedited(self, row: _Row, model: nn.Module, tok) -> None:
        instruction = self.config.instruction if row.name == "prompt" else None
        cost = {"edit_seconds": 0.0, "peak_rss_bytes": None, "changed_params": 0, "edit_bytes": 0}
        if instruction:
            folder = save_prompt_edit(
                self.out / "edits" / row.name, instruction, self.config.model, {"method": row.name}
            )
            cost["edit_bytes"] = folder_bytes(folder)
        row.result["cost"] = cost
        self._evaluate_global_edit(row, model, tok, adapter=False, instruction=instruction)

    def _run_surgery(self, row: _Row, from_records: bool) -> None:
        hp = self.surgery_hparams
        if from_records:
            hp = hp.replace(probe_data=None, probe_path=None)
        model, tok = load_model(self.config.model, device=self.config.device)
        progress = self.config.progress

        if self.instance and from_records:  # per instance first, on the unedited model: one record, one probe

            def edit_one(record: dict) -> Callable[[], None]:
                edit = build_edit(
                    model, tok, hp, requests=safeedit_requests([record]), data_dir=self.data_dir, progress=False
                ).edit
                weights_copy = apply_edit(model, edit)
                return lambda: revert_edit(model, weights_copy)

            instance_summary, instance_rows = self.evaluate_instances(model, tok, edit_one)

        cost: dict = {}
        with measure(cost):
            requests = safeedit_requests(self.edit_records) if from_records else None
            probe, _, edit = build_edit(model, tok, hp, requests=requests, data_dir=self.data_dir, progress=progress)
        folder = self.out / "edits" / row.name
        records = [r.get("id") for r in self.edit_records] if from_records else None
        folder.mkdir(parents=True)
        write_adapter(
            edit,
            ModelGates(model),
            folder,
            base_model_name=self.config.model,
            metadata={
                "hparams": hp.to_dict(),
                "probe_sha256": probe.sha256(),
                "versions": package_versions(),
                "method": row.name,
                "edit_records": records,
            },
        )
        # the numbers below are those of the saved adapter; it must be the in-place edit
        weights_copy = apply_edit(model, edit)
        expected = _logits(model, tok, self.reload_prompts)
        revert_edit(model, weights_copy)
        peft_model = load_edited(model, folder)
        row.result["edit"] = {
            "kind": "surgery",
            "folder": str(folder.relative_to(self.out)),
            "rows": edit.regions.num_rows,
            "layers": len(edit.layers),
            "alpha": edit.alpha,
            "probe": {k: v for k, v in probe.metadata.items() if k != "versions"},
            "edit_records": records,
            "reload_max_abs_logprob_diff": float(
                (_logits(peft_model, tok, self.reload_prompts) - expected).abs().max()
            ),
        }
        cost.update(changed_params=adapter_changed_params(folder), edit_bytes=folder_bytes(folder))
        row.result["cost"] = cost
        results, samples = self.evaluate_global(row, peft_model, tok, adapter=True)
        if self.instance:
            if from_records:
                summary, rows = instance_summary, instance_rows
            else:
                summary, rows = self.evaluate_fixed_instances(peft_model, tok)
            results["suites"]["safeedit"] = summary
            samples += rows
        if not from_records and self.config.controls:
            self._run_controls(row, peft_model, tok, folder)
        if not from_records and self.config.alphas:
            toxic = next((s for s in ("rtp", "toxigen") if s in self.global_suites), None)
            curve_suites = [s for s in self.global_suites if s in (toxic, "ppl", "kl")]
            curve = []
            for alpha in tqdm(self.config.alphas, desc=f"{row.name}: alpha curve", disable=not progress):
                set_alpha(peft_model, alpha)
                res, _ = self.evaluate_global(row, peft_model, tok, adapter=True, suites=curve_suites, sampled=False)
                curve.append({"alpha": alpha, "suites": res["suites"]})
            set_alpha(peft_model, edit.alpha)
            row.result["curve"] = curve
        self._finish(row, results, samples)

    def _run_baseline(self, row: _Row) -> None:
        from ...integrations.easyedit.baselines import BASELINES, EasyEditBaseline

        baseline = BASELINES[row.method]
        hparams = copy_module.deepcopy(self.baseline_hparams[row.method])
        runner = EasyEditBaseline(
            baseline, hparams, self.out / "easyedit" / row.name, self.data_dir, self.config.progress
        )
        model, tok = runner.model, runner.tok
        progress = self.config.progress

        if self.instance:  # per instance first, on the unedited model

            def edit_one(record: dict) -> Callable[[], None]:
                weights_copy = runner.edit(runner.requests([record])[0])
                return lambda: runner.restore(weights_copy)

            instance_summary, instance_rows = self.evaluate_instances(model, tok, edit_one)
            if runner.located_layers:
                instance_summary["located_layers"] = list(runner.located_layers)
            runner.located_layers.clear()

        requests = runner.requests(self.edit_records)
        originals: dict[str, torch.Tensor] = {}
        cost: dict = {}
        with measure(cost):
            for request in tqdm(requests, desc=f"{row.name}: edit", unit="record", disable=not progress):
                for name, before in runner.edit(request).items():
                    originals.setdefault(name, before)  # the weights before the first edit
        meta = {
            "method": row.name,
            "alg_name": baseline.alg_name,
            "hparams": {**dataclasses.asdict(hparams), "source": hparams.source},
            "edit_records": [r.get("id") for r in self.edit_records],
        }
        max_rank = len(requests) if baseline.low_rank else None
        edited = self._save_and_reload(row, model, tok, originals, cost, meta, max_rank)
        row.result["edit"].update(edit_records=meta["edit_records"], hparams_file=hparams.source)
        if runner.mom2:
            row.result["edit"]["mom2"] = runner.mom2
        if runner.located_layers:
            row.result["edit"]["located_layers"] = list(runner.located_layers)
        results, samples = self.evaluate_global(row, edited, tok, adapter=baseline.low_rank)
        if self.instance:
            instance_summary["hparams_file"] = hparams.source
            results["suites"]["safeedit"] = instance_summary
            samples += instance_rows
        self._finish(row, results, samples)

    # ------------------------------------------------------------------ shared steps

    def _save_and_reload(
        self,
        row: _Row,
        model: nn.Module,
        tok,
        originals: dict[str, torch.Tensor],
        cost: dict,
        meta: dict,
        max_rank: int | None,
    ) -> nn.Module:
        """Save the in-place weight edit (a LoRA of rank <= ``max_rank``, else the changed tensors), restore the
        unedited weights, load the saved edit back and check that it is the evaluated edit and changes the model;
        returns the reloaded model (what the row evaluates)."""
        cost["changed_params"] = changed_params(model, originals)
        folder = self.out / "edits" / row.name
        if max_rank is not None:
            save_low_rank_edit(model, originals, folder, self.config.model, max_rank, meta)
        else:
            save_tensors_edit(model, originals, folder, self.config.model, meta)
        cost["edit_bytes"] = folder_bytes(folder)
        if max_rank is not None:
            cost["edit_changed_params_saved"] = adapter_changed_params(folder)
        row.result["cost"] = cost
        # evaluate what was saved: back to the unedited weights, then the saved edit loaded onto them
        expected = _logits(model, tok, self.reload_prompts)
        revert_edit(model, originals)
        unedited = _logits(model, tok, self.reload_prompts)
        edited, record = load_saved_edit(model, folder)
        reloaded = _logits(edited, tok, self.reload_prompts)
        row.result["edit"] = {
            "kind": record["kind"],
            "folder": str(folder.relative_to(self.out)),
            "tensors": sorted(originals),
            "reload_max_abs_logprob_diff": float((reloaded - expected).abs().max()),
        }
        self._check_changes(row, unedited, reloaded)
        return edited

    def _check_changes(self, row: _Row, unedited: torch.Tensor, edited: torch.Tensor) -> None:
        """The saved edit against the unedited model (config.NO_CHANGE_BELOW: what counts as no change)."""
        change = float((edited - unedited).abs().max())
        row.result["edit"]["max_abs_logprob_change"] = change
        if not change >= NO_CHANGE_BELOW:
            raise SurgeryError(
                f"{row.name}'s saved edit does not change the model: it moves the next-token log-probs of "
                f"{len(self.reload_prompts)} benign prompts by at most {change:.2g} (< {NO_CHANGE_BELOW:g})"
            )

    def _probe(self, model: nn.Module, tok):
        """The shipped YAML's probe, built on ``model`` (the same data, layer and seed as the surgery row's)."""
        probe, _ = build_probe(model, tok, self.surgery_hparams, data_dir=self.data_dir, progress=self.config.progress)
        return probe

    def _probe_record(self, row: _Row, probe) -> dict:
        """What a saved edit built from the shipped probe records about how it was made."""
        return {
            "method": row.name,
            "probe_sha256": probe.sha256(),
            "probe": {k: v for k, v in probe.metadata.items() if k != "versions"},
            "hparams": self.surgery_hparams.to_dict(),
        }

    def _run_controls(self, row: _Row, peft_model: nn.Module, tok, folder) -> None:
        """Same-size random-direction Surgery edits on the toxicity suites' prompts: the null band."""
        from ..evaluate import control_band, evaluate_controls

        suites = [s for s in self.global_suites if s in ("rtp", "toxigen")]
        if not suites:
            return
        measured = evaluate_controls(
            peft_model, tok, {s: self.settings(s) for s in suites}, folder, self.config.controls, self.config.seed
        )
        self.control_band = control_band(self.row_samples["unedited"], measured)
        row.result["controls"] = {"n": self.config.controls, "seeds": [seed for seed, _, _ in measured]}

    # ------------------------------------------------------------------ training-free rows on the same probe

    def _steering_layer(self, model: nn.Module) -> int:
        n_layers = len(architectures.decoder_layers(model))
        index = architectures.hidden_state_index(self.surgery_hparams.probe_layer, n_layers)
        if index >= n_layers:
            raise SurgeryError(
                "steering adds the direction at a decoder layer's input; probe layer "
                f"{self.surgery_hparams.probe_layer} is the final hidden state"
            )
        return index

    def _tuning_point(self, model: nn.Module, tok) -> dict:
        """RTP toxic rate (every judge) and perplexity on the tuning split: steering's choice."""
        limit = self.config.tune_limit
        rtp, _ = evaluate(model, tok, ["rtp"], self.settings("rtp", "tune", limit=limit, samples=None, progress=False))
        ppl, _ = evaluate(model, tok, ["ppl"], self.settings("ppl", "tune", ppl_limit=limit, progress=False))
        rates = metric_values(rtp["suites"]["rtp"], PROTOCOLS["rtp"].metric("toxic_rate"))
        return {
            "toxic_rate": {j: v for j, (v, _) in rates.items()},
            "token_perplexity": ppl["suites"]["ppl"]["token_perplexity"],
        }

    def _choose_steering(self, model: nn.Module, tok, layer: int, unit: torch.Tensor, norm: float) -> dict:
        """Steering's strength on the tuning split (:func:`search_steering_scale`), with what each point measured."""
        c = self.config
        judge = self.judges[0].name
        base = self._tuning_point(model, tok)
        bar = tqdm(total=len(c.steering_scales), desc="steering: strength on the tuning split", disable=not c.progress)

        def measure_scale(scale: float) -> dict:
            with added_direction(model, layer, -scale * norm * unit):
                point = self._tuning_point(model, tok)
            if bar.n >= bar.total:  # a halving below the grid
                bar.total += 1
            bar.update()
            return point

        with bar:
            points, chosen = search_steering_scale(
                measure_scale, c.steering_scales, base["token_perplexity"] * (1 + c.max_ppl_increase), judge
            )
        return {
            "judge": judge,
            "split": "tune",
            "limit": c.tune_limit,
            "max_ppl_increase": c.max_ppl_increase,
            "unedited": base,
            "points": points,
            "chosen_scale": chosen["scale"],
            "met_constraint": chosen["feasible"],
            "below_grid": STEERING_BELOW_GRID,
        }

    def _run_steering(self, row: _Row) -> None:
        model, tok = load_model(self.config.model, device=self.config.device)
        layer = self._steering_layer(model)
        benign = [
            d["text"]
            for d in load_benign_documents(
                self.data_dir, limit=self.config.tune_limit, start=self.settings("ppl", "tune").benign_start
            )
        ]
        cost: dict = {}
        with measure(cost):
            probe = self._probe(model, tok)
            unit = unit_vector(probe.direction)
            norm = mean_token_norm(model, tok, benign, layer, batch_size=self.config.batch_size, progress=False)
        started = time.perf_counter()
        tuning = self._choose_steering(model, tok, layer, unit, norm)
        tuning["seconds"] = round(time.perf_counter() - started, 1)
        vector = -tuning["chosen_scale"] * norm * unit
        folder = self.out / "edits" / row.name
        unedited = _logits(model, tok, self.reload_prompts)
        meta = {**self._probe_record(row, probe), "scale": tuning["chosen_scale"], "residual_norm": norm}
        # a PEFT adapter (a down-projection bias) where that is the same edit on this model, else a hook
        check_ids = tok(self.reload_prompts[0], return_tensors="pt").input_ids.to(model.device)
        save_steering(model, layer, vector, folder, self.config.model, check_ids, meta)
        cost.update(changed_params=0, edit_bytes=folder_bytes(folder))
        row.result["cost"] = cost
        edited, record = load_saved_edit(model, folder)
        try:
            row.result["edit"] = {
                "kind": record["kind"],
                "folder": str(folder.relative_to(self.out)),
                "layer": layer,
                "scale": tuning["chosen_scale"],
                "vector_norm": record["vector_norm"],
                "residual_norm": norm,
                "probe_sha256": meta["probe_sha256"],
                **({"hook_because": record["hook_because"]} if "hook_because" in record else {}),
            }
            row.result["tuning"] = tuning
            self._check_changes(row, unedited, _logits(edited, tok, self.reload_prompts))
            self._evaluate_global_edit(row, edited, tok, adapter=record["kind"] == "lora")
        finally:
            if "hook" in record:
                record["hook"].remove()

    def _run_ablation(self, row: _Row) -> None:
        model, tok = load_model(self.config.model, device=self.config.device)
        cost: dict = {}
        with measure(cost):
            probe = self._probe(model, tok)
            originals = apply_ablation(model, probe.direction)
        linear = all(
            name.endswith(".weight") and isinstance(model.get_submodule(name.removesuffix(".weight")), nn.Linear)
            for name in originals
        )
        meta = {**self._probe_record(row, probe), "exact": not architectures.gate_spec(model).post_block_norms}
        edited = self._save_and_reload(row, model, tok, originals, cost, meta, 1 if linear else None)
        row.result["edit"].update(
            probe_sha256=meta["probe_sha256"],
            matrices=len(originals),
            # Gemma 2/3 normalise block outputs before the residual sum: the weight ablation is approximate there
            exact=meta["exact"],
        )
        self._evaluate_global_edit(row, edited, tok, adapter=linear)

    def _evaluate_global_edit(
        self, row: _Row, model: nn.Module, tok, adapter: bool, instruction: str | None = None
    ) -> None:
        """The global suites, and the per-instance protocol with the global edit in place (it does not depend on
        the record); then the row is finished."""
        results, samples = self.evaluate_global(row, model, tok, adapter=adapter, instruction=instruction)
        if self.instance:
            summary, rows = self.evaluate_fixed_instances(model, tok, instruction)
            results["suites"]["safeedit"] = summary
            samples += rows
        self._finish(row, results, samples)
