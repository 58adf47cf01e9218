"""Publish a finished paired run (`surgery eval --paired --out RUN_DIR`) as benchmarks/results/NAME.{md,json,png}.

The run's own ``paired.md`` / ``paired.json`` / ``paired.png`` are what was measured; this adds what a reader of
the results folder needs beside them: what was edited and how the adapter was built, the command, its time and
the machine it ran on.

    python benchmarks/paired_report.py runs/att_gemma3_gate_report --name report_gemma3_attitude_gate \\
        --title "..." --what "..." --command "surgery ... eval ..." --adapter "surgery ... edit ..." \\
        --minutes 21 --threads 1 --machine "2-core CPU, beside one other one-thread job"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from surgery_plugin.io.files import atomic_write, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the --out folder of a finished paired run (holds paired.json)")
    parser.add_argument("--name", required=True, help="file stem under --results")
    parser.add_argument("--title", required=True)
    parser.add_argument("--what", required=True, help="the prompts, splits and arms, in a sentence")
    parser.add_argument("--command", required=True, help="the eval command that made RUN")
    parser.add_argument("--adapter", required=True, help="how the adapter was built")
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--machine", required=True)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    paired = json.loads((args.run / "paired.json").read_text(encoding="utf-8"))
    table = (args.run / "paired.md").read_text(encoding="utf-8").strip()
    png = args.run / "paired.png"
    write_json(
        args.results / f"{args.name}.json",
        {
            "what": args.what,
            "command": args.command,
            "adapter": args.adapter,
            "minutes": args.minutes,
            "threads": args.threads,
            "machine": args.machine,
            **paired,
        },
    )
    plot = ""
    if png.is_file():
        atomic_write(args.results / f"{args.name}.png", png.read_bytes())
        plot = f"\n\n![paired](./{args.name}.png)"
    atomic_write(
        args.results / f"{args.name}.md",
        f"# {args.title}\n\nCommand ({args.minutes:g} min, {args.threads} thread(s), {args.machine}): "
        f"`{args.command}`. Adapter: {args.adapter}. {args.what}\n\n{table}{plot}\n",
    )


if __name__ == "__main__":
    main()
