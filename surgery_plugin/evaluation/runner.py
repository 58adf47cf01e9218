"""``surgery eval``: run suites on a model (optionally with an adapter) and write RUN_DIR."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from torch import nn

from ..errors import SurgeryError
from .suites import SUITES, EvalSettings


def parse_suites(suites: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in (suites.split(",") if isinstance(suites, str) else suites) if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise SurgeryError(f"unknown suite '{unknown[0]}'; available: {', '.join(SUITES)}")
    if not names:
        raise SurgeryError("no suite given; available: " + ", ".join(SUITES))
    return names


def evaluate(model: nn.Module, tokenizer, suites: str | Sequence[str], settings: EvalSettings) -> tuple[dict, list[dict]]:
    """Run each suite; returns ``({"suites": {...}, "timing_s": {...}}, samples)``."""
    results: dict = {"suites": {}, "timing_s": {}}
    samples: list[dict] = []
    for name in parse_suites(suites):
        start = time.perf_counter()
        summary, rows = SUITES[name](model, tokenizer, settings)
        results["suites"][name] = summary
        results["timing_s"][name] = round(time.perf_counter() - start, 2)
        samples.extend(rows)
    return results, samples


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_run(run_dir: str | os.PathLike, results: dict, samples: list[dict]) -> Path:
    """``results.json`` and ``samples.jsonl``, each written to a temp file and renamed into place."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    _atomic_write(run_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return run_dir


def write_alpha_sweep(run_dir: str | os.PathLike, runs: list[dict]) -> Path:
    """``sweep.json`` (one entry per alpha) and, when rtp and ppl ran, ``sweep.png``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "sweep.json", json.dumps({"runs": runs}, indent=2) + "\n")
    if all({"rtp", "ppl"} <= set(r["suites"]) for r in runs):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["suites"]["ppl"]["perplexity"] for r in runs]
        ys = [r["suites"]["rtp"]["toxic_rate"] for r in runs]
        ax.plot(xs, ys, marker="o")
        for r, x, y in zip(runs, xs, ys):
            ax.annotate(f"alpha {r['alpha']:g}", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("perplexity (benign text)")
        ax.set_ylabel(f"toxic rate (RTP, {runs[0]['suites']['rtp']['judge']})")
        ax.set_title("alpha sweep of one surgery adapter")
        fig.tight_layout()
        tmp = run_dir / f".sweep.png.tmp-{os.getpid()}.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, run_dir / "sweep.png")
        plt.close(fig)
    return run_dir
