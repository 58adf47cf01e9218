"""``surgery eval``: run suites on a model (optionally with an adapter) and write RUN_DIR.

RUN_DIR holds ``results.json`` (schema in docs/evaluation.md), ``samples.jsonl`` (every
generation with its scores), ``report.md`` and plots; every file is written to a temp name and
renamed into place, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..config import parse_list
from ..errors import SurgeryError, first_line
from ..io.files import json_safe, json_text, output, write_manifest
from .judges import judge_info
from .protocols import PROTOCOLS, EvalSettings
from .report import pyplot, render_report, save_figure, write_plots
from .suites import run_suite

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2


def parse_suites(suites: str | Sequence[str]) -> list[str]:
    """Suite names, checked: built-in suites, else lm-eval task names (when lm-eval is installed)."""
    names = list(parse_list(suites, "suite", hint=f" (available: {', '.join(PROTOCOLS)}, or an lm-eval task name)"))
    others = [s for s in names if s not in PROTOCOLS]
    if others:
        from ..integrations.lm_eval.suite import lm_eval_available, lm_eval_task_names

        if not lm_eval_available():
            raise SurgeryError(
                f"unknown suite '{others[0]}'; available: {', '.join(PROTOCOLS)} "
                "(other names go to lm-eval: pip install lm-eval)"
            )
        known = lm_eval_task_names(others)
        unknown = [s for s in others if s not in known]
        if unknown:
            raise SurgeryError(
                f"unknown suite '{unknown[0]}': not one of {', '.join(PROTOCOLS)} nor an lm-eval task "
                f"(list them with `lm_eval --tasks list`)"
            )
    return names


def evaluate(
    model: nn.Module, tokenizer, suites: str | Sequence[str], settings: EvalSettings
) -> tuple[dict, list[dict]]:
    """Run each suite; returns ``(results, samples)``.

    ``results`` = ``{"suites", "timing_s", "judges", "judge_info", "settings", ...}``.
    """
    names = parse_suites(suites)
    judges = list(settings.judges)
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "suites": {},
        "timing_s": {},
        "judges": [j.name for j in judges],
        "judge_info": {},
        "settings": settings.describe(),
    }
    samples: list[dict] = []
    for name in names:
        start = time.perf_counter()
        summary, rows = run_suite(name, model, tokenizer, settings)
        results["suites"][name] = summary
        results["timing_s"][name] = round(time.perf_counter() - start, 2)
        samples.extend(rows)
    # after the suites: judges such as perspective count their requests and failures while scoring
    results["judge_info"] = {j.name: judge_info(j) for j in judges}
    return results, samples


def evaluate_plan(model: nn.Module, tokenizer, settings: dict[str, EvalSettings]) -> tuple[dict, list[dict]]:
    """One results dict over several suites, each run with its own settings (:func:`.protocols.plan`)."""
    results, samples = None, []
    for suite, suite_settings in settings.items():
        run, rows = evaluate(model, tokenizer, [suite], suite_settings)
        samples += rows
        if results is None:
            results = run
            results["settings"] = {}
        else:
            results["suites"].update(run["suites"])
            results["timing_s"].update(run["timing_s"])
            results["judge_info"].update(run["judge_info"])
        results["settings"][suite] = suite_settings.describe()
    return results, samples


def write_run_files(run_dir: Path, results: dict, samples: list[dict], report: bool = True) -> Path:
    """``samples.jsonl``, ``results.json``, then (``report``) ``report.md`` + plots into a folder being written
    (inside an :func:`surgery_plugin.io.files.output`); its manifest last."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "samples.jsonl").write_text(
        "".join(json.dumps(json_safe(s), ensure_ascii=False, allow_nan=False) + "\n" for s in samples),
        encoding="utf-8",
    )
    (run_dir / "results.json").write_text(json_text(results, indent=2), encoding="utf-8")
    if report:
        try:
            plots = write_plots(run_dir, results)
        except Exception as err:  # a plot is a view of the numbers: losing it must not lose the run
            logger.warning("the run's plots failed (%s); report.md without them", first_line(err))
            plots = []
        (run_dir / "report.md").write_text(render_report(results, plots), encoding="utf-8")
    write_manifest(run_dir, {"kind": "run", "schema_version": SCHEMA_VERSION})
    return run_dir


def write_run(
    run_dir: str | os.PathLike, results: dict, samples: list[dict], report: bool = True, overwrite: bool = False
) -> Path:
    """An eval run folder (RUN_DIR), whole or not at all: an older run there is replaced only with ``overwrite``."""
    with output(run_dir, "run", overwrite) as tmp:
        write_run_files(tmp, results, samples, report)
    return Path(run_dir)


def write_alpha_sweep(run_dir: Path, runs: list[dict]) -> Path:
    """``sweep.json`` (one entry per alpha) and, when rtp and ppl ran, ``sweep.png``, into a folder being written
    (the runs of each alpha beside them, :func:`write_run_files`); the manifest last."""
    run_dir = Path(run_dir)
    (run_dir / "sweep.json").write_text(json_text({"runs": runs}, indent=2), encoding="utf-8")
    plottable = all({"rtp", "ppl"} <= set(r["suites"]) for r in runs)
    plt = pyplot("sweep.json without sweep.png") if plottable else None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["suites"]["ppl"]["token_perplexity"] for r in runs]
        ys = [r["suites"]["rtp"]["toxic_rate"] for r in runs]
        ax.plot(xs, ys, marker="o")
        for r, x, y in zip(runs, xs, ys, strict=True):
            ax.annotate(f"alpha {r['alpha']:g}", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("token perplexity (benign text)")
        ax.set_ylabel(f"toxic rate (RTP, {runs[0]['suites']['rtp']['judge']})")
        ax.set_title("alpha sweep of one surgery adapter")
        fig.tight_layout()
        save_figure(fig, run_dir, "sweep.png")
        plt.close(fig)
    write_manifest(run_dir, {"kind": "sweep", "alphas": [r["alpha"] for r in runs]})
    return run_dir
