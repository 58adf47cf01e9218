"""Each behavior's edit, both directions, and several at once: one model load, adapters switched.

For one model, with each behavior's shipped YAML: probe and edit every behavior (on the unedited
model, and the paper's sequential recipe for the stack), then evaluate on the *report* splits:

- each behavior's suites with its edit off, on (alpha as shipped) and reversed ("surrender", -alpha);
- a stack of all behaviors' edits (independent probes, then sequential probes): every behavior's
  headline suites at once, and the capability cost (perplexity, KL) of the stack.

Every edited run is also compared with the unedited one prompt by prompt (the same prompts and seeds):
paired changes with 95% bootstrap intervals and McNemar p (``paired`` entries, tables in the markdown).

Writes JSON (every number with its CI) and a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/behaviors.py --model smollm2-135m --behaviors toxicity,jailbreak,attitude \\
        --limit 100 --out benchmarks/results/behaviors_smollm2.json
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from surgery_plugin.behaviors import get_behavior as behavior
from surgery_plugin.behaviors import hparams_for
from surgery_plugin.config import SurgeryHyperParams
from surgery_plugin.core.provenance import package_versions
from surgery_plugin.evaluation.judges import load_judges
from surgery_plugin.evaluation.paired import paired_changes, paired_table
from surgery_plugin.evaluation.protocols import plan
from surgery_plugin.evaluation.report import comparison_table
from surgery_plugin.evaluation.runner import evaluate_plan
from surgery_plugin.io.adapter import set_alpha
from surgery_plugin.io.files import atomic_write, write_json
from surgery_plugin.io.stack import export_stack, load_stack
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import build_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--behaviors", default="toxicity,jailbreak,attitude")
    parser.add_argument("--limit", type=int, default=100, help="prompts per generation suite (report splits)")
    parser.add_argument("--ppl-limit", type=int, default=200)
    parser.add_argument("--skip-surrender", action="store_true")
    parser.add_argument(
        "--singles", default=None, help="the behaviors measured with their own edit alone (default: all of them)"
    )
    parser.add_argument(
        "--stacks",
        default="independent,sequential",
        help="which stacks of all the behaviors to measure (several behaviors only); '' for none",
    )
    parser.add_argument(
        "--hparams",
        default="",
        help="behavior=yaml,...: a YAML instead of the behavior's shipped one (e.g. a candidate being validated)",
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/behaviors_smollm2.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    started = time.perf_counter()
    names = [b.strip() for b in args.behaviors.split(",") if b.strip()]
    specs = {name: behavior(name) for name in names}
    overrides = dict(item.split("=", 1) for item in args.hparams.split(",") if item.strip())
    if set(overrides) - set(names):
        parser.error(f"--hparams names behaviors outside --behaviors {names}: {sorted(set(overrides) - set(names))}")
    hparams = {
        name: SurgeryHyperParams.from_hparams(overrides.get(name) or hparams_for(args.model, name)) for name in names
    }
    model, tok = load_model(args.model)
    judges = {name: load_judges(spec.judges, data_dir=args.data_dir, progress=False) for name, spec in specs.items()}
    all_judges = {j.name: j for js in judges.values() for j in js}
    headline = [s for name in names for s in specs[name].suites if s not in ("ppl", "kl")]
    suites = list(dict.fromkeys([*headline, "ppl", "kl"]))

    base_rows: list[dict] = []  # the unedited model's samples of every suite measured: the paired reference

    def measure(peft_model, only: list[str], base: bool = False) -> dict:
        settings = plan(
            only, "report", list(all_judges.values()), args.data_dir, limit=args.limit, ppl_limit=args.ppl_limit
        )
        results, rows = evaluate_plan(peft_model, tok, settings)
        if base:
            base_rows.extend(rows)
            return results["suites"]
        reference = [r for r in base_rows if r.get("suite") in only]
        return {**results["suites"], "paired": paired_changes(reference, rows)}

    def save(result: dict, complete: bool) -> None:
        result["complete"] = complete
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["versions"] = package_versions()
        result["command"] = (
            f"python benchmarks/behaviors.py --model {args.model} --behaviors {args.behaviors} --limit {args.limit} "
            f"--ppl-limit {args.ppl_limit} --stacks '{args.stacks}'"
            + (" --skip-surrender" if args.skip_surrender else "")
            + (f" --singles '{args.singles}'" if args.singles is not None else "")
            + (f" --hparams '{args.hparams}'" if args.hparams else "")
        )
        write_json(args.out, result)
        lines = []
        for name, entry in result["single"].items():
            runs = [("base", entry["base"])]
            runs += [(f"+ {name} edit", entry["edited"])] if "edited" in entry else []
            runs += [("surrender (-alpha)", entry["surrender"])] if "surrender" in entry else []
            lines += [f"### {name}", "", comparison_table(runs, list(specs[name].suites)), ""]
            for arm in ("edited", "surrender"):
                if "paired" in entry.get(arm, {}):
                    lines += [f"{arm}, paired with base:", "", paired_table(entry[arm]["paired"]), ""]
        base_all = {s: v for entry in result["single"].values() for s, v in entry["base"].items()}
        base_all.update(result["stack_base"])
        if result["stacks"]:
            runs = [("base", base_all)] + [(f"stack ({k})", v) for k, v in result["stacks"].items()]
            lines += ["### all at once", "", comparison_table(runs, suites), ""]
            for k, v in result["stacks"].items():
                lines += [f"stack ({k}), paired with base:", "", paired_table(v["paired"]), ""]
        atomic_write(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")

    result = {
        "model": args.model,
        "behaviors": names,
        "limit": args.limit,
        "hparams": {n: h.to_dict() for n, h in hparams.items()},
        "single": {},
        "stacks": {},
        "stack_base": {},
    }
    with tempfile.TemporaryDirectory() as work:
        stacks = {}
        recipes = [s.strip() for s in args.stacks.split(",") if s.strip()] if len(names) > 1 else []
        unknown = set(recipes) - {"independent", "sequential"}
        if unknown:
            parser.error(f"--stacks takes independent, sequential; got {sorted(unknown)}")
        # the single-behavior edits come from the independent stack's adapters: always built
        for sequential in (False, True) if "sequential" in recipes else (False,):
            built = build_stack(
                model, tok, [(n, hparams[n]) for n in names], sequential=sequential, data_dir=args.data_dir
            )
            stacks[sequential] = export_stack(built, model, Path(work) / f"stack-{sequential}", args.model, sequential)
        singles = [b.strip() for b in args.singles.split(",") if b.strip()] if args.singles is not None else names
        if set(singles) - set(names):
            parser.error(f"--singles must be among --behaviors {names}")
        # cheapest-first and saved after every measurement: a run stopped early keeps what it measured
        for name in singles:
            own = list(specs[name].suites)
            peft_model = load_stack(model, stacks[False], names=[name])
            with peft_model.disable_adapter():
                result["single"][name] = {"base": measure(peft_model, own, base=True)}
            save(result, complete=False)
            result["single"][name]["edited"] = measure(peft_model, own)
            save(result, complete=False)
            peft_model.unload()
        for sequential, folder in stacks.items():
            if ("sequential" if sequential else "independent") not in recipes:
                continue
            peft_model = load_stack(model, folder)
            measured_base = {s for entry in result["single"].values() for s in entry["base"]}
            missing = [s for s in suites if s not in measured_base and s not in result["stack_base"]]
            if missing:  # the base numbers of suites no single behavior measured (see --singles)
                with peft_model.disable_adapter():
                    result["stack_base"].update(measure(peft_model, missing, base=True))
            result["stacks"]["sequential" if sequential else "independent"] = measure(peft_model, suites)
            save(result, complete=False)
            peft_model.unload()
        if not args.skip_surrender:
            for name in singles:
                peft_model = load_stack(model, stacks[False], names=[name])
                set_alpha(peft_model, -hparams[name].alpha, name)
                result["single"][name]["surrender"] = measure(peft_model, list(specs[name].suites))
                save(result, complete=False)
                peft_model.unload()
    save(result, complete=True)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
