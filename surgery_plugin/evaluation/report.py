"""``report.md``, plots and comparison tables, from ``results.json`` dicts (nothing is recomputed here).

Which numbers appear, with which label and direction, comes from :data:`.protocols.PROTOCOLS`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..io.files import atomic_path
from .paired import comparison_rows
from .protocols import PROTOCOLS, Metric

logger = logging.getLogger(__name__)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(ci) -> str:
    return "" if not ci or ci[0] is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _plain(value: float) -> str:
    """A number that is not a share: two decimals, three significant digits below 1 (a KL of 0.0023)."""
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def _arrow(metric: Metric) -> str:
    return "↑" if metric.higher_is_better else "↓"


def metric_values(summary: dict, metric: Metric) -> dict[str, tuple[float | None, list | None]]:
    """``{judge or "-": (value, ci95)}`` of one metric in one suite summary; empty when it did not run."""
    container = summary.get(metric.section) if metric.section else summary
    if not container:
        return {}
    if metric.per_judge:
        return {
            j: (v.get(metric.key), v.get(f"{metric.key}_ci95") if metric.ci else None)
            for j, v in (container.get("by_judge") or {}).items()
            if metric.key in v
        }
    if metric.key not in container:
        return {}
    return {"-": (container[metric.key], container.get(f"{metric.key}_ci95") if metric.ci else None)}


def _size(summary: dict, metric: Metric) -> str:
    if metric.section == "sampling":
        return f" (k={summary['sampling']['k']})"
    if "n" in summary:
        return f" (n={summary['n']})"
    if "n_tokens" in summary:
        return f" ({summary['n_tokens']} tokens)"
    return ""


def headline_rows(results: dict) -> list[tuple[str, str, dict[str, str]]]:
    """(suite, metric, {judge or '-': cell}) rows of the report table: one column per judge."""
    rows = []
    for name, summary in results.get("suites", {}).items():
        if name in PROTOCOLS:
            for metric in PROTOCOLS[name].metrics:
                values = metric_values(summary, metric)
                if values:
                    cells = {j: (_pct(v) + _ci(ci)) if metric.percent else _num(v) for j, (v, ci) in values.items()}
                    rows.append((name, f"{metric.label} {_arrow(metric)}{_size(summary, metric)}", cells))
        elif "lm_eval_task" in summary:
            for metric, value in summary["metrics"].items():
                if isinstance(value, (int, float)) and "stderr" not in metric:
                    rows.append((name, f"{metric} (lm-eval)", {"-": _num(float(value))}))
    return rows


def render_report(results: dict, plots: list[str]) -> str:
    judges = results.get("judges", [])
    lines = ["# Evaluation report", ""]
    meta = {k: results.get(k) for k in ("model", "adapter", "alpha") if k in results}
    if meta:
        lines += [" | ".join(f"**{k}**: {v}" for k, v in meta.items()), ""]
    lines += ["Content warning: the samples file holds model generations for toxic and harmful prompts.", ""]
    rows = headline_rows(results)
    if rows:
        columns = judges + (["-"] if any("-" in cells for _, _, cells in rows) else [])
        header = ["suite", "metric"] + [c if c != "-" else "(judge-free)" for c in columns]
        lines += ["## Headline", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for suite, metric, cells in rows:
            lines.append("| " + " | ".join([suite, metric] + [cells.get(c, "") for c in columns]) + " |")
        lines += [
            "",
            "Rates are shares of texts with judge score >= threshold (0.5) unless named otherwise; "
            "brackets are 95% Wilson intervals; ↑/↓: higher/lower is better. "
            "SafeEdit DS/DG = share judged *safe*.",
            "",
        ]
    missing = {
        (suite, j): v.get("n_missing", v.get("n_missing_samples", 0))
        for suite, s in results.get("suites", {}).items()
        for j, v in (s.get("by_judge") or {}).items()
        if v.get("n_missing")
    }
    if missing:
        lines += [
            "**Missing scores** (excluded from rates, never counted as 0): "
            + ", ".join(f"{suite}/{j}: {n}" for (suite, j), n in missing.items()),
            "",
        ]
    for name, summary in results.get("suites", {}).items():
        if name in PROTOCOLS and PROTOCOLS[name].by_group:
            lines += group_table(summary, f"## {PROTOCOLS[name].title} by target group")
    info = results.get("judge_info", {})
    if info:
        lines += ["## Judges", ""]
        for name, entry in info.items():
            details = ", ".join(
                f"{k}: {_num(v, 3) if isinstance(v, float) else v}" for k, v in entry.items() if k != "name"
            )
            lines.append(f"- **{name}**: {details}")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    timing = results.get("timing_s", {})
    if timing:
        lines += ["Timing (s): " + ", ".join(f"{k} {v}" for k, v in timing.items()), ""]
    return "\n".join(lines)


def group_table(summary: dict, title: str) -> list[str]:
    """Per-target-group toxic rates (with 95% intervals), one column per judge."""
    judges = summary["judges"]
    lines = [title, "", "| group | n | " + " | ".join(judges) + " |", "|" + "---|" * (2 + len(judges))]
    for group in sorted(summary["by_group"]):
        cells = [
            _pct(summary["by_judge"][j]["by_group"][group]["toxic_rate"])
            + _ci(summary["by_judge"][j]["by_group"][group]["toxic_rate_ci95"])
            for j in judges
        ]
        lines.append(f"| {group} | {summary['by_group'][group]['n']} | " + " | ".join(cells) + " |")
    return lines + [""]


def group_comparison(runs: Sequence[tuple[str, dict]]) -> str:
    """Per-target-group toxic rates of several runs of a by-group suite (ToxiGen), with 95% intervals:
    one row per group, one column per (judge, run)."""
    first = runs[0][1]
    judges = first["judges"]
    header = ["group", "n"] + [f"{judge}: {name}" for judge in judges for name, _ in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in sorted(first["by_group"]):
        cells = []
        for judge in judges:
            for _, summary in runs:
                stats = summary["by_judge"][judge]["by_group"][group]
                cells.append(_pct(stats["toxic_rate"]) + _ci(stats["toxic_rate_ci95"]))
        lines.append(f"| {group} | {first['by_group'][group]['n']} | " + " | ".join(cells) + " |")
    cells = []
    for judge in judges:
        for _, summary in runs:
            cells.append(
                _pct(summary["by_judge"][judge]["toxic_rate"]) + _ci(summary["by_judge"][judge]["toxic_rate_ci95"])
            )
    lines.append(f"| **all** | {first['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(
    runs: Sequence[tuple[str, dict]],
    suites: Sequence[str] | None = None,
    change_from_first: bool = True,
    extra: Sequence[dict[str, str]] | None = None,
    label: str = "model",
) -> str:
    """Markdown table, one row per named run (``(name, results["suites"])``), one column per headline
    metric and judge (rates as fractions with their 95% interval), and a row of relative changes
    against the first run. ``extra``: more columns after the metrics, one ``{column: text}`` per run;
    a suite a run lacks (a failed run) shows n/a."""
    first = runs[0][1]
    suites = [s for s in (suites or first) if s in PROTOCOLS and s in first]
    columns: list[tuple[str, Metric, str]] = []  # (suite, metric, judge or "-")
    for suite in suites:
        for metric in PROTOCOLS[suite].metrics:
            if metric.headline:
                columns += [(suite, metric, judge) for judge in metric_values(first[suite], metric)]
    header, rule = [label], ["---"]
    for suite, metric, judge in columns:
        name = f"{suite} {metric.key}" + (f" ({judge})" if judge != "-" else "")
        header += [name] + (["95% CI"] if metric.ci else [])
        rule += ["---"] + (["---"] if metric.ci else [])
    extra_columns = list(extra[0]) if extra else []
    header += extra_columns
    rule += ["---"] * len(extra_columns)

    def cell(summary: dict, suite: str, metric: Metric, judge: str) -> list[str]:
        value, ci = metric_values(summary.get(suite, {}), metric).get(judge, (None, None))
        text = "n/a" if value is None else f"{value:.3f}" if metric.percent else _plain(value)
        interval = [f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and ci[0] is not None else ""] if metric.ci else []
        return [text] + interval

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for i, (name, summary) in enumerate(runs):
        more = [extra[i].get(c, "") for c in extra_columns] if extra else []
        lines.append("| " + " | ".join([name] + [c for col in columns for c in cell(summary, *col)] + more) + " |")
    if change_from_first and len(runs) > 1:
        for name, summary in runs[1:]:
            changes = []
            for suite, metric, judge in columns:
                base = metric_values(first[suite], metric).get(judge, (None, None))[0]
                value = metric_values(summary.get(suite, {}), metric).get(judge, (None, None))[0]
                text = f"{100 * (value - base) / base:+.1f}%" if base and value is not None else "n/a"
                changes += [text] + ([""] if metric.ci else [])
            row_label = "change" if len(runs) == 2 else f"change ({name})"
            lines.append("| " + " | ".join([row_label] + changes) + " |")
    return "\n".join(lines)


def save_figure(fig, run_dir: Path, name: str) -> str:
    """Save a matplotlib figure atomically as ``run_dir/name``; returns the name."""
    with atomic_path(Path(run_dir) / name) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(name).suffix.lstrip(".") or "png")
    return name


def pyplot(left_out: str):
    """matplotlib's pyplot on the Agg backend; without matplotlib (an optional extra) None, and a warning saying
    what the run leaves out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: %s (pip install matplotlib)", left_out)
        return None
    return plt


def plot_paired_changes(ax, paired: dict) -> None:
    """Every row of a paired comparison (:func:`~.paired.comparison_rows`: each suite's outcomes, the sampled
    protocol's, the capability cost) as its change with the 95% interval, and the controls' band (grey) where
    they ran."""
    rows = comparison_rows(paired)
    controls = paired.get("controls", {})
    for y, (label, name, o) in enumerate(rows):
        band = controls.get(label, {}).get(name)
        if band:
            ax.plot(band["range"], [y, y], color="#bbbbbb", lw=9, solid_capstyle="butt", zorder=1)
        low, high = o["ci95"]
        if o["change"] != o["change"]:  # NaN: nothing was scored in both arms
            continue
        ax.errorbar(
            [o["change"]],
            [y],
            xerr=[[max(0.0, o["change"] - low)], [max(0.0, high - o["change"])]],
            fmt="o",
            color="#2a7ab9",
            capsize=4,
            zorder=2,
        )
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{label} {name}" for label, name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(
        "paired change, edited - base (ppl: relative; 95% bootstrap interval; grey: range of the random-direction "
        "controls)",
        fontsize=8,
    )


def write_paired_plot(run_dir: Path, paired: dict, title: str) -> list[str]:
    """``paired.png``: :func:`plot_paired_changes` on its own figure."""
    plt = pyplot("paired.md without a plot")
    if plt is None:
        return []
    rows = len(comparison_rows(paired))
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * rows))
    plot_paired_changes(ax, paired)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    name = save_figure(fig, run_dir, "paired.png")
    plt.close(fig)
    return [name]


def write_plots(run_dir: Path, results: dict) -> list[str]:
    """``toxigen_groups.png`` (per-group bars, a colour per judge) and ``judges.png`` (judged headline rates)."""
    plt = pyplot("report.md without plots")
    if plt is None:
        return []
    written = []
    suites = results.get("suites", {})
    toxigen = suites.get("toxigen")
    if toxigen:
        groups = sorted(toxigen["by_group"])
        judges = toxigen["judges"]
        width = 0.8 / len(judges)
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) + 2), 4))
        for k, judge in enumerate(judges):
            values = [toxigen["by_judge"][judge]["by_group"][g]["toxic_rate"] or 0.0 for g in groups]
            ax.bar([i + k * width for i in range(len(groups))], [100 * v for v in values], width, label=judge)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("% toxic continuations")
        ax.set_title(f"ToxiGen hate prompts by target group (n={toxigen['n']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, run_dir, "toxigen_groups.png"))
        plt.close(fig)
    bars = []  # (label, judge, rate, ci)
    for suite, summary in suites.items():
        if suite not in PROTOCOLS:
            continue
        for metric in PROTOCOLS[suite].metrics:
            if metric.headline and metric.per_judge and metric.percent:
                for judge, (value, ci) in metric_values(summary, metric).items():
                    bars.append((f"{suite}\n{metric.key} {_arrow(metric)}", judge, value, ci))
    if bars:
        labels = list(dict.fromkeys(b[0] for b in bars))
        judges = list(dict.fromkeys(b[1] for b in bars))
        width = 0.8 / len(judges)
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels) + 1), 4))
        for k, judge in enumerate(judges):
            xs, ys, errs = [], [], [[], []]
            for i, label in enumerate(labels):
                match = [b for b in bars if b[0] == label and b[1] == judge and b[2] is not None]
                if match:
                    _, _, rate, ci = match[0]
                    xs.append(i + k * width)
                    ys.append(100 * rate)
                    # max(0, ...): a Wilson bound can miss a rate of 0 or 1 by a rounding error (1 - 1e-16)
                    errs[0].append(max(0.0, 100 * (rate - ci[0])) if ci and ci[0] is not None else 0)
                    errs[1].append(max(0.0, 100 * (ci[1] - rate)) if ci and ci[1] is not None else 0)
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=judge)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=8)
        ax.set_ylabel("% of generations")
        ax.set_title("judged shares by judge (95% Wilson intervals; ↑/↓ = higher/lower is better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, run_dir, "judges.png"))
        plt.close(fig)
    return written
