"""The README's comparison table, generated from ``surgery compare`` runs (their ``compare.json``).

One row per method of every run given (the unedited row once per model): the paired change against the
unedited model with its 95% interval and the random-control band where the run had controls, for the RTP toxic
rate (greedy), the sampled protocol's share of toxic samples (where the run sampled) and the ToxiGen toxic rate,
all by the run's first judge; the perplexity change (its interval over documents) and KL; each method's effect
against Surgery as shipped on the same prompts (the most powerful measure the run has: sampled, else greedy) and
its edit time, peak memory and saved size over Surgery's (``report.equal_effect_rows``). Prints markdown;
``--out`` also writes it.

    python benchmarks/compare_summary.py benchmarks/results/compare_smollm2_full.json \\
        benchmarks/results/compare_gemma3_free.json --out benchmarks/results/compare_summary.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from surgery_plugin.commands.compare.report import cost_cells, equal_effect_rows, measure_outcome
from surgery_plugin.evaluation.paired import format_change
from surgery_plugin.io.files import atomic_write

COLUMNS = (
    "model",
    "method",
    "RTP greedy: toxic rate change [95% CI] (null)",
    "RTP sampled: share of toxic samples, change [95% CI] (null)",
    "ToxiGen: toxic rate change [95% CI] (null)",
    "perplexity change [95% CI]",
    "KL",
    "effect vs Surgery as shipped",
    "cost over Surgery's (time / memory / size)",
    "20x cheaper claim holds",
    "edit time",
    "peak memory",
    "saved edit",
)


def _band(controls: dict, unit: str, outcome: str) -> str:
    band = (controls.get(unit) or {}).get(outcome)
    return f" (null {band['range'][0]:+.3f}..{band['range'][1]:+.3f})" if band else ""


def _cells(method: dict, judge: str, base_ppl: float | None) -> list[str]:
    """The paired-change cells of one method (``-`` where the run did not measure it)."""
    paired = method.get("paired") or {}
    controls = paired.get("controls") or {}
    greedy = measure_outcome(paired, "rtp", judge, "greedy")
    share = measure_outcome(paired, "rtp", judge, "sampled")
    tox = measure_outcome(paired, "toxigen", judge, "greedy")
    k = ((paired.get("suites") or {}).get("rtp") or {}).get("sampled", {}).get("k")
    capability = paired.get("capability") or {}
    ppl = (capability.get("ppl") or {}).get("token perplexity (relative change)")
    kl = (method.get("suites", {}).get("kl") or {}).get("mean_kl")
    if ppl is None and base_ppl:  # a run older than the paired perplexity: the change without its interval
        after = (method.get("suites", {}).get("ppl") or {}).get("token_perplexity")
        ppl = None if after is None else {"change": after / base_ppl - 1, "ci95": None}
    return [
        format_change(greedy, missing="-") + (_band(controls, "rtp", f"toxic/{judge}") if greedy else ""),
        format_change(share, missing="-") + (_band(controls, f"rtp k={k}", f"sample rate/{judge}") if share else ""),
        format_change(tox, missing="-") + (_band(controls, "toxigen", f"toxic/{judge}") if tox else ""),
        format_change(ppl, percent=True, missing="-"),
        "-" if kl is None else f"{kl:.3f}",
    ]


def _versus_surgery(result: dict) -> dict[str, list[str]]:
    """Per method: its effect against Surgery as shipped (by the sampled share where the run sampled, else greedy),
    its costs over Surgery's and whether "Surgery is >= 20x cheaper at equal or better effect" holds against it."""
    rows = equal_effect_rows(result, "sampled") or equal_effect_rows(result, "greedy")
    out = {}
    for r in rows:
        ratios = " / ".join("n/a" if x is None else f"{x:.3g}x" for x in r["cost_ratio"].values())
        out[r["name"]] = [
            f"{r['verdict']} ({format_change(r['minus_surgery'], missing='-')}, {r['measure']})",
            ratios,
            r["claim"],
        ]
    return out


def rows(result: dict, seen_unedited: set) -> list[str]:
    settings, methods = result["settings"], result["methods"]
    model, judge = settings["model"], settings["judges"][0]
    versus = _versus_surgery(result)
    base_ppl = (methods["unedited"]["suites"].get("ppl") or {}).get("token_perplexity")
    out = []
    for name, m in methods.items():
        if name == "unedited" and model in seen_unedited:
            continue
        if m["status"] != "ok":
            out.append(f"| {model} | {m['label']} | failed: {m['error']} |" + " |" * (len(COLUMNS) - 3))
            continue
        if name == "unedited":
            ppl = (m["suites"].get("ppl") or {}).get("token_perplexity")
            cells = ["-"] * 3 + ["-" if ppl is None else f"(perplexity {ppl:.2f})", "0"]
            cost = {"edit time": "-", "peak memory (+ during edit)": "-", "saved edit": "-"}
        else:
            cells, cost = _cells(m, judge, base_ppl), cost_cells(m)
        vs = ["-", "1x" if name == "surgery-shipped" else "-", "-"]
        vs = versus.get(name, vs)
        out.append(
            f"| {model} | {m['label']} | "
            + " | ".join([*cells, *vs, cost["edit time"], cost["peak memory (+ during edit)"], cost["saved edit"]])
            + " |"
        )
    for name in settings.get("not_measured", []):  # a partial look (--reuse-only) names what it lacks
        out.append(f"| {model} | {name} | not measured yet |" + " |" * (len(COLUMNS) - 3))
    seen_unedited.add(model)
    return out


def summary(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    seen: set = set()
    for result in results:
        lines += rows(result, seen)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="compare.json files")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    text = summary([json.loads(Path(p).read_text()) for p in args.runs])
    print(text)
    if args.out:
        atomic_write(args.out, text)


if __name__ == "__main__":
    main()
