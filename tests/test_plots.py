"""Every plot is a view of numbers written beside it: without matplotlib (an optional extra) the numbers are
still written, the plot is left out, and a warning says so."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from surgery_plugin.commands.compare.report import write_tradeoff_plot
from surgery_plugin.commands.demo import _plot
from surgery_plugin.commands.tune.report import plot_front
from surgery_plugin.evaluation.report import write_paired_plot, write_plots
from surgery_plugin.evaluation.runner import write_alpha_sweep

RUNS = [
    {"alpha": a, "suites": {"rtp": {"toxic_rate": r, "judge": "profanity"}, "ppl": {"token_perplexity": p}}}
    for a, r, p in ((0.0, 0.3, 80.0), (1.0, 0.2, 88.0))
]


@pytest.fixture
def no_matplotlib(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    caplog.set_level(logging.WARNING)
    return caplog


def _warned(caplog, what: str) -> bool:
    return any("matplotlib is not installed" in r.getMessage() and what in r.getMessage() for r in caplog.records)


def test_the_alpha_sweep_keeps_its_numbers_without_matplotlib(no_matplotlib, tmp_path):
    write_alpha_sweep(tmp_path, RUNS)
    assert [r["alpha"] for r in json.loads((tmp_path / "sweep.json").read_text())["runs"]] == [0.0, 1.0]
    assert not (tmp_path / "sweep.png").exists() and _warned(no_matplotlib, "sweep.png")


def test_every_other_plot_is_left_out_with_a_warning(no_matplotlib, tmp_path):
    plot_front({"trials": []}, tmp_path / "front.png")
    _plot({}, {}, tmp_path / "summary.png", "title", ["rtp"], {"suites": {}})
    assert write_tradeoff_plot(tmp_path, {"settings": {"suites": ["rtp", "ppl"]}}) is None
    assert write_paired_plot(tmp_path, {"suites": {}}, "title") == []
    assert write_plots(tmp_path, {"suites": {}}) == []
    assert list(tmp_path.iterdir()) == []
    for what in ("front.png", "summary.png", "tradeoff.png", "paired.md", "report.md"):
        assert _warned(no_matplotlib, what), what


def test_the_alpha_sweep_plot_is_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    write_alpha_sweep(tmp_path, RUNS)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
