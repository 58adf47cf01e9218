"""Two edits head to head: the paired change from one edit's generations to another's, on the same prompts and seeds.

Each paired run keeps its arms' generations: `surgery eval --paired --out RUN` in ``RUN/base`` and ``RUN/edited``,
`surgery compare --out RUN` in ``RUN.arms/unedited`` and ``RUN.arms/<row>``. Two runs whose unedited arms generated
the same rows for a suite ran that suite on the same prompts with the same seeds, so their edits can be compared
row by row there: the difference of the two edits, with the same paired bootstrap intervals and McNemar tests as an
edit against the unedited model. That answers "is the new point better than the one it replaces", which the two
runs' separate intervals against the base cannot. Suites whose unedited rows differ (other prompts, another
count) are left out and named. Writes NAME.{md,json} under --results.

    python benchmarks/head_to_head.py runs/shipped/gemma3_k25 runs/tox_gemma3_trial2/k25c \\
        --name head_to_head_gemma3_gate_vs_shipped_k25
    python benchmarks/head_to_head.py runs/compare_smollm2_full.arms:surgery-shipped \\
        runs/val/smollm2_likelihood/report --name head_to_head_smollm2_likelihood_vs_shipped
"""

from __future__ import annotations

import argparse
from pathlib import Path

from surgery_plugin.evaluation.arms import read_arm
from surgery_plugin.evaluation.paired import paired_changes, paired_table
from surgery_plugin.io.files import atomic_write, write_json

UNEDITED = ("base", "unedited")  # the unedited arm's name in `eval --paired` runs and in `compare` stores


def _run_arms(spec: str) -> tuple[list[dict], list[dict]]:
    """``RUN[:ARM]`` -> (the unedited arm's rows, ARM's rows); ARM defaults to ``edited``."""
    run, _, arm = spec.partition(":")
    run, arm = Path(run), arm or "edited"
    unedited = next((run / name for name in UNEDITED if (run / name / "samples.jsonl").is_file()), None)
    if unedited is None:
        raise SystemExit(f"{run} holds no unedited arm ({' or '.join(UNEDITED)}/samples.jsonl)")
    if not (run / arm / "samples.jsonl").is_file():
        raise SystemExit(f"{run} holds no arm {arm} (no {arm}/samples.jsonl)")
    return read_arm(unedited)[1], read_arm(run / arm)[1]  # (results.json, samples.jsonl) of each


def _by_suite(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["suite"], []).append(row)
    return out


def shared_suites(base_a: list[dict], base_b: list[dict]) -> tuple[list[str], list[str]]:
    """(suites both unedited arms generated identically, suites both ran but differently)."""
    a, b = _by_suite(base_a), _by_suite(base_b)
    common = sorted(a.keys() & b.keys())
    return [s for s in common if a[s] == b[s]], [s for s in common if a[s] != b[s]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="RUN[:ARM] of the edit to compare against (ARM: default edited)")
    parser.add_argument("after", help="RUN[:ARM] of the other edit")
    parser.add_argument("--name", required=True, help="file stem under --results")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    (base_a, edit_a), (base_b, edit_b) = _run_arms(args.before), _run_arms(args.after)
    suites, differing = shared_suites(base_a, base_b)
    if not suites:
        raise SystemExit(
            f"{args.before} and {args.after} share no suite run on the same prompts and seeds: their unedited arms "
            f"differ ({', '.join(differing) or 'no suite in common'})"
        )
    paired = paired_changes(*([r for r in rows if r["suite"] in suites] for rows in (edit_a, edit_b)))
    table = paired_table(paired)
    left_out = f" Left out (unedited rows differ): {', '.join(differing)}." if differing else ""
    write_json(
        args.results / f"{args.name}.json",
        {"before": args.before, "after": args.after, "suites": suites, "left_out": differing, "paired": paired},
    )
    atomic_write(
        args.results / f"{args.name}.md",
        f"# {args.after} against {args.before}, paired\n\n"
        f"`python benchmarks/head_to_head.py {args.before} {args.after} --name {args.name}`. 'before' is the first "
        f"edit, 'after' the second; suites {', '.join(suites)}, whose unedited rows are identical in both runs."
        f"{left_out}\n\n{table}\n",
    )
    print(table)


if __name__ == "__main__":
    main()
