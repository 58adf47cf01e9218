"""Two edits head to head: the paired change from one edit's generations to another's, on the same prompts and seeds.

Each paired run keeps its arms' generations: `surgery eval --paired --out RUN` in ``RUN/base`` and ``RUN/edited``,
`surgery compare --out RUN` in ``RUN.arms/unedited`` and ``RUN.arms/<row>``. Two runs whose unedited arms generated
the same rows for a suite ran that suite on the same prompts with the same seeds, so their edits can be compared
row by row there: the difference of the two edits, with the same paired bootstrap intervals and McNemar tests as an
edit against the unedited model. That answers "is the new point better than the one it replaces", which the two
runs' separate intervals against the base cannot. A suite's greedy rows and its sampled rows (``SUITE:sample``) are
matched apart, and where one run's unedited rows are the first rows of the other's (``--limit 100`` against
``--limit 300`` of the same split) the shared first rows are compared. Suites whose unedited rows differ otherwise
are left out and named. Writes NAME.{md,json} under --results.

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


def _by_unit(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by suite, greedy and sampled apart (``rtp``, ``rtp:sample``): the units two runs can share."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        decoding = row.get("decoding", "greedy")
        out.setdefault(row["suite"] if decoding == "greedy" else f"{row['suite']}:{decoding}", []).append(row)
    return out


def _generation(row: dict) -> dict:
    """A row without its judges' scores: judged in other batches, the same text can score differently in the 7th
    digit, and the pairing needs the same prompts and continuations, not the same float rounding."""
    return {key: value for key, value in row.items() if key != "scores"}


def shared_units(base_a: list[dict], base_b: list[dict]) -> tuple[dict[str, int], list[str]]:
    """({unit: how many of its first rows both unedited arms generated identically}, units both ran but differently).
    A unit is shared when one arm's rows are the other's first rows (the same split at a smaller --limit)."""
    a, b = _by_unit(base_a), _by_unit(base_b)
    shared, differing = {}, []
    for unit in sorted(a.keys() & b.keys()):
        n = min(len(a[unit]), len(b[unit]))
        if [_generation(r) for r in a[unit][:n]] == [_generation(r) for r in b[unit][:n]]:
            shared[unit] = n
        else:
            differing.append(unit)
    return shared, differing


def _keep(rows: list[dict], shared: dict[str, int]) -> list[dict]:
    """The rows of ``rows`` in the shared units, each unit cut to its shared first rows."""
    units = _by_unit(rows)
    return [row for unit, n in shared.items() for row in units.get(unit, [])[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="RUN[:ARM] of the edit to compare against (ARM: default edited)")
    parser.add_argument("after", help="RUN[:ARM] of the other edit")
    parser.add_argument("--name", required=True, help="file stem under --results")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    (base_a, edit_a), (base_b, edit_b) = _run_arms(args.before), _run_arms(args.after)
    shared, differing = shared_units(base_a, base_b)
    if not shared:
        raise SystemExit(
            f"{args.before} and {args.after} share no suite run on the same prompts and seeds: their unedited arms "
            f"differ ({', '.join(differing) or 'no suite in common'})"
        )
    paired = paired_changes(_keep(edit_a, shared), _keep(edit_b, shared))
    table = paired_table(paired)
    units = ", ".join(f"{unit} ({n} rows)" for unit, n in shared.items())
    left_out = f" Left out (unedited rows differ): {', '.join(differing)}." if differing else ""
    write_json(
        args.results / f"{args.name}.json",
        {"before": args.before, "after": args.after, "suites": shared, "left_out": differing, "paired": paired},
    )
    atomic_write(
        args.results / f"{args.name}.md",
        f"# {args.after} against {args.before}, paired\n\n"
        f"`python benchmarks/head_to_head.py {args.before} {args.after} --name {args.name}`. 'before' is the first "
        f"edit, 'after' the second; {units}: the rows whose unedited generations are identical in both runs."
        f"{left_out}\n\n{table}\n",
    )
    print(table)


if __name__ == "__main__":
    main()
