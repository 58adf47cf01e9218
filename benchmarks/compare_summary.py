"""The README's comparison table, generated from ``surgery compare`` runs (their ``compare.json``).

One row per method of every run given (the unedited row once per model): the paired change of the RTP and ToxiGen
toxic rates by the first judge with 95% intervals, the random-control band where the run had controls, the
perplexity change and KL against the same run's unedited row, and the edit's time and saved size. Prints
markdown; ``--out`` also writes it.

    python benchmarks/compare_summary.py benchmarks/results/compare_smollm2_free.json \\
        benchmarks/results/compare_smollm2_edit.json benchmarks/results/compare_gemma3_free.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from surgery_plugin.commands.compare.report import cost_cells
from surgery_plugin.io.files import atomic_write


def _change(method: dict, suite: str, key: str) -> str:
    o = method.get("paired", {}).get("suites", {}).get(suite, {}).get("outcomes", {}).get(key)
    if not o:
        return "-"
    low, high = o["ci95"]
    text = f"{o['change']:+.3f} [{low:+.3f}, {high:+.3f}]"
    band = method.get("paired", {}).get("controls", {}).get(suite, {}).get(key)
    return text + (f" (null {band['range'][0]:+.2f}..{band['range'][1]:+.2f})" if band else "")


def rows(result: dict, seen_unedited: set) -> list[str]:
    settings, methods = result["settings"], result["methods"]
    model, judge = settings["model"], settings["judges"][0]
    base = methods["unedited"]["suites"].get("ppl", {}).get("token_perplexity")
    out = []
    for name, m in methods.items():
        if name == "unedited" and model in seen_unedited:
            continue
        if m["status"] != "ok":
            out.append(f"| {model} | {m['label']} | failed: {m['error']} | | | | | |")
            continue
        ppl = m["suites"].get("ppl", {}).get("token_perplexity")
        ppl_text = "-" if ppl is None or base is None else f"{ppl:.1f} ({(ppl / base - 1) * 100:+.1f}%)"
        kl = m["suites"].get("kl", {}).get("mean_kl")
        cost = cost_cells(m) if name != "unedited" else {"edit time": "-", "saved edit": "-"}
        out.append(
            f"| {model} | {m['label']} | {_change(m, 'rtp', f'toxic/{judge}')} | "
            f"{_change(m, 'toxigen', f'toxic/{judge}')} | {ppl_text} | "
            f"{'-' if kl is None else f'{kl:.3f}'} | {cost['edit time']} | {cost['saved edit']} |"
        )
    seen_unedited.add(model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="compare.json files")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = [json.loads(Path(p).read_text()) for p in args.runs]
    judges = sorted({r["settings"]["judges"][0] for r in results})
    lines = [
        f"| model | method | RTP toxic rate, change [95% CI] ({', '.join(judges)}) | ToxiGen, change [95% CI] | "
        "perplexity | KL | edit time | saved edit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen: set = set()
    for result in results:
        lines += rows(result, seen)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write(args.out, text)


if __name__ == "__main__":
    main()
