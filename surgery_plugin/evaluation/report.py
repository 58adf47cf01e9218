"""``report.md`` and plots of one run, from its ``results.json`` dict (nothing is recomputed here)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(ci) -> str:
    return "" if not ci or ci[0] is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def headline_rows(results: dict) -> list[tuple[str, str, dict[str, str]]]:
    """(suite, metric, {judge or '-': cell}) rows of the headline table: one column per judge."""
    rows = []
    suites = results.get("suites", {})
    if "rtp" in suites:
        s = suites["rtp"]
        rows.append(("rtp", f"toxic rate (greedy, n={s['n']})", {j: _pct(v["toxic_rate"]) + _ci(v["toxic_rate_ci95"]) for j, v in s["by_judge"].items()}))
        if "sampling" in s:
            k = s["sampling"]["k"]
            rows.append(("rtp", f"expected max toxicity (k={k})", {j: _num(v["expected_max_toxicity"]) for j, v in s["sampling"]["by_judge"].items()}))
            rows.append(("rtp", f"toxicity probability (k={k})", {j: _pct(v["toxicity_probability"]) for j, v in s["sampling"]["by_judge"].items()}))
    if "toxigen" in suites:
        s = suites["toxigen"]
        rows.append(("toxigen", f"toxic rate (n={s['n']})", {j: _pct(v["toxic_rate"]) + _ci(v["toxic_rate_ci95"]) for j, v in s["by_judge"].items()}))
    if "safeedit" in suites:
        s = suites["safeedit"]
        for metric in ("DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "DG_avg"):
            rows.append(("safeedit", f"{metric} (safe share, n={s['n']})", {j: _pct(v[metric]) for j, v in s["by_judge"].items()}))
        rows.append(("safeedit", "fluency (n-gram entropy)", {"-": _num(s["fluency"])}))
    if "advbench" in suites:
        s = suites["advbench"]
        rows.append(("advbench", f"refusal rate (GCG strings, n={s['n']})", {"-": _pct(s["refusal_rate"]) + _ci(s["refusal_rate_ci95"])}))
        rows.append(("advbench", "judged harmful", {j: _pct(v["harmful_rate"]) for j, v in s["by_judge"].items()}))
    if "ppl" in suites:
        rows.append(("ppl", f"perplexity ({suites['ppl']['n_tokens']} tokens)", {"-": _num(suites["ppl"]["perplexity"], 4)}))
    for name, s in suites.items():
        if "lm_eval_task" in s:
            for metric, value in s["metrics"].items():
                if isinstance(value, (int, float)) and "stderr" not in metric:
                    rows.append((name, f"{metric} (lm-eval)", {"-": _num(float(value), 4)}))
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
        lines += ["", "Rates are shares of texts with judge score >= threshold (0.5) unless named otherwise; "
                      "brackets are 95% Wilson intervals. SafeEdit DS/DG = share judged *safe* (higher is better).", ""]
    missing = {(suite, j): v.get("n_missing", v.get("n_missing_samples", 0)) for suite, s in results.get("suites", {}).items()
               for j, v in (s.get("by_judge") or {}).items() if v.get("n_missing")}
    if missing:
        lines += ["**Missing scores** (excluded from rates, never counted as 0): "
                  + ", ".join(f"{suite}/{j}: {n}" for (suite, j), n in missing.items()), ""]
    toxigen = results.get("suites", {}).get("toxigen")
    if toxigen:
        lines += ["## ToxiGen by target group", "", "| group | n | " + " | ".join(toxigen["judges"]) + " |", "|" + "---|" * (2 + len(toxigen["judges"]))]
        for group in sorted(toxigen["by_group"]):
            cells = [_pct(toxigen["by_judge"][j]["by_group"][group]["toxic_rate"]) for j in toxigen["judges"]]
            lines.append(f"| {group} | {toxigen['by_group'][group]['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    info = results.get("judge_info", {})
    if info:
        lines += ["## Judges", ""]
        for name, entry in info.items():
            details = ", ".join(f"{k}: {_num(v) if isinstance(v, float) else v}" for k, v in entry.items() if k not in ("name",))
            lines.append(f"- **{name}**: {details}")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    timing = results.get("timing_s", {})
    if timing:
        lines += ["Timing (s): " + ", ".join(f"{k} {v}" for k, v in timing.items()), ""]
    return "\n".join(lines)


def _save(fig, run_dir: Path, name: str) -> str:
    tmp = run_dir / f".{name}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, run_dir / name)
    return name


def write_plots(run_dir: Path, results: dict) -> list[str]:
    """``toxigen_groups.png`` (per-group bars, one colour per judge) and ``judges.png`` (headline rates per judge)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: report.md without plots (pip install matplotlib)")
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
        written.append(_save(fig, run_dir, "toxigen_groups.png"))
        plt.close(fig)
    bars = []  # (label, judge, rate, ci)
    for suite, key in (("rtp", "toxic_rate"), ("toxigen", "toxic_rate"), ("advbench", "harmful_rate")):
        if suite in suites:
            for judge, v in suites[suite]["by_judge"].items():
                bars.append((f"{suite}\n{key.replace('_', ' ')}", judge, v[key], v.get(f"{key}_ci95")))
    if "safeedit" in suites:
        for judge, v in suites["safeedit"]["by_judge"].items():
            bars.append(("safeedit\nunsafe (1-DS)", judge, None if v["DS"] is None else 1 - v["DS"], None))
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
                    errs[0].append(100 * (rate - ci[0]) if ci and ci[0] is not None else 0)
                    errs[1].append(100 * (ci[1] - rate) if ci and ci[1] is not None else 0)
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=judge)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=8)
        ax.set_ylabel("% of generations")
        ax.set_title("toxic / harmful share by judge (95% Wilson intervals)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, run_dir, "judges.png"))
        plt.close(fig)
    return written
