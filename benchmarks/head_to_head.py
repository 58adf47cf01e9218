"""Two edits head to head: the paired change from one edit's generations to another's, on the same prompts and seeds.

Each paired run (`surgery eval --paired --out RUN`) keeps its arms' generations in ``RUN/edited/samples.jsonl``.
Two runs with the same suites, prompts, samples and seeds (only the adapter differs) can be compared row by row:
the difference of the two edits, with the same paired bootstrap intervals and McNemar tests as an edit against
the unedited model. That is the test of "is the new point better than the one it replaces", which the two runs'
separate intervals against the base cannot answer. Writes NAME.{md,json} under --results.

    python benchmarks/head_to_head.py runs/shipped/gemma3_k25 runs/tox_gemma3_trial2/k25c \\
        --name head_to_head_gemma3_gate_vs_shipped_k25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from surgery_plugin.evaluation.paired import paired_changes, paired_table
from surgery_plugin.io.files import atomic_write, write_json


def _samples(run: Path, arm: str) -> list[dict]:
    with open(run / arm / "samples.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the --out folder of the paired run of the edit to compare against")
    parser.add_argument("after", type=Path, help="the --out folder of the paired run of the other edit")
    parser.add_argument("--name", required=True, help="file stem under --results")
    parser.add_argument("--arm", default="edited", help="the arm of each run to compare (default: edited)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    base_a, base_b = _samples(args.before, "base"), _samples(args.after, "base")
    if base_a != base_b:  # the same unedited generations prove the same prompts, seeds and decoding
        raise SystemExit(
            f"{args.before} and {args.after} did not run the same prompts and seeds: their base arms differ"
        )
    paired = paired_changes(_samples(args.before, args.arm), _samples(args.after, args.arm))
    table = paired_table(paired)
    write_json(
        args.results / f"{args.name}.json",
        {"before": str(args.before), "after": str(args.after), "arm": args.arm, **paired},
    )
    atomic_write(
        args.results / f"{args.name}.md",
        f"# {args.after} against {args.before} (arm {args.arm}), paired\n\n"
        f"`python benchmarks/head_to_head.py {args.before} {args.after} --name {args.name}`. 'before' is the first "
        "run's edit, 'after' the second's; both runs' unedited arms are identical.\n\n" + table + "\n",
    )
    print(table)


if __name__ == "__main__":
    main()
