"""The ``surgery`` command: probe -> edit -> eval, plus demo, merge, model-path and tasks-path.

Bad input ends with one line, ``surgery: error: ...`` and exit code 2; ``surgery -v ...`` adds
the chain of causes (and debug logging).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from .errors import SurgeryError, first_line

logger = logging.getLogger("surgery_plugin")
DEFAULT_MODEL = "smollm2-135m"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"surgery: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite ``kind`` within [low, high] (``low_open``: above ``low``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got '{text}'"
            ) from err
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
FINITE = _number(float)


def _hparams(args, required: bool = True):
    """``--hparams``, else the shipped YAML of ``--model`` and ``--behavior`` (``<model>[-<behavior>].yaml``)."""
    from .demo import hparams_for
    from .hparams import SurgeryHyperParams

    if args.hparams:
        return SurgeryHyperParams.from_hparams(args.hparams)
    behavior_name = getattr(args, "behavior", None) or "toxicity"
    try:
        return SurgeryHyperParams.from_hparams(hparams_for(args.model, behavior_name))
    except SurgeryError:
        if required:
            raise
        return SurgeryHyperParams(model_name=args.model, behavior=behavior_name)


def _load(args, hparams=None, probe_layer=None):
    """The model the command names, on ``--device`` or spread by ``--device-map`` (else the hparams'
    ``device`` / ``model_parallel``); with ``probe_layer`` only the layers its features need."""
    from .models import load_model

    if args.device is not None and args.device_map is not None:
        raise SurgeryError("--device and --device-map exclude each other; pass one")
    device = args.device if args.device is not None else (hparams.device if hparams is not None else None)
    device_map = args.device_map or (
        "auto" if hparams is not None and hparams.model_parallel and args.device is None else None
    )
    return load_model(args.model, dtype=args.dtype, device=device, device_map=device_map, probe_layer=probe_layer)


def cmd_model_path(args) -> None:
    from .models import resolve_model_path

    print(resolve_model_path(args.model))


def cmd_tasks_path(args) -> None:
    from .lm_eval_tasks import tasks_path

    print(tasks_path())


def cmd_probe(args) -> None:
    from .evaluation.protocols import behavior
    from .probe import probe_from_hparams
    from .probe_data import load_probe_data

    spec = behavior(args.behavior)
    hp = _hparams(args, required=False)
    changes = {
        "probe_layer": args.layer,
        "pooling": args.pooling,
        "probe_max_per_class": args.max_per_class,
        "seed": args.seed,
    }
    hp = hp.replace(**{k: v for k, v in changes.items() if v is not None})
    data_name = args.data or hp.probe_data or spec.probe_data
    # only the layers before the probe layer, unless the data is the model's own continuations (they need it all)
    needs_all = "self" in (part.strip() for part in data_name.split("+"))
    model, tok = _load(args, hp) if needs_all else _load(args, hp, probe_layer=hp.probe_layer)
    data = load_probe_data(data_name, model, tok, args.data_dir, hp.probe_max_per_class, hp.seed, hp.probe_self_judge)
    probe, metrics = probe_from_hparams(model, tok, data, hp)
    probe.metadata["behavior"] = spec.name
    probe.save(args.out)
    print(
        f"probe -> {args.out}  {spec.name} ({data_name})  layer {probe.metadata['layer']}  held-out accuracy "
        f"{metrics['test_accuracy']:.4f}  AUC {metrics['test_auc']:.4f}  "
        f"(n_train {metrics['n_train']}, n_test {metrics['n_test']})"
    )


def cmd_edit(args) -> None:
    from .adapter import export_adapter
    from .evaluation.protocols import behavior
    from .models import resolve_model_path
    from .probe import Probe
    from .provenance import package_versions
    from .streaming import CheckpointGates, too_big_to_load
    from .surgery import edit_from_hparams, execute_surgery

    spec = behavior(args.behavior)
    hp = _hparams(args)
    hp = hp.replace(**{k: v for k, v in {"alpha": args.alpha, "top_k": args.top_k}.items() if v is not None})
    path = resolve_model_path(args.model)
    streaming = args.streaming or too_big_to_load(path, args.dtype)
    if streaming and hp.needs_reference_stats():
        raise SurgeryError(
            f"probe_project_out={hp.probe_project_out!r} / region_scoring={hp.region_scoring!r} need the "
            "model's hidden states on benign text: they cannot stream; load the model (drop --streaming)"
        )
    if streaming:  # only the gate tensors, read from the shards; the adapter is the same bits
        base = CheckpointGates(path, dtype=args.dtype, name=args.model)
        probe = Probe.load(args.probe, base)
        edit = execute_surgery(base, probe, hp, progress=True)
    else:
        base, tok = _load(args, hp)
        probe = Probe.load(args.probe, base)
        edit = edit_from_hparams(base, tok, probe, hp, args.data_dir)
    out = export_adapter(
        edit,
        base,
        args.out,
        base_model_name=args.model,
        overwrite=args.overwrite,
        metadata={
            "hparams": hp.to_dict(),
            "behavior": spec.name,
            "probe_file": str(args.probe),
            "probe_sha256": probe.sha256(),
            "versions": package_versions(),
            "streaming": streaming,
        },
    )
    print(
        f"adapter -> {out}  {edit.regions.num_rows} gate rows in {len(edit.layers)} layers, "
        f"alpha {hp.alpha} (step {edit.step:.4g})"
    )


def _parse_alphas(text: str) -> list[float]:
    try:
        alphas = [FINITE(a) for a in text.split(",") if a.strip()]
    except argparse.ArgumentTypeError as err:
        raise SurgeryError(f"--alpha-sweep takes comma-separated finite numbers, got '{text}'") from err
    if not alphas:
        raise SurgeryError("--alpha-sweep is empty")
    return alphas


def cmd_eval(args) -> None:
    from .data.splits import toxigen_groups
    from .evaluation import EvalSettings, evaluate, load_judges, parse_suites, write_run
    from .evaluation.protocols import behavior
    from .evaluation.report import metric_values
    from .evaluation.runner import evaluate_report, report_settings

    spec = behavior(args.behavior) if args.behavior else None
    suites = parse_suites(args.suite or (",".join(spec.suites) if spec else "rtp,ppl"))
    alphas = _parse_alphas(args.alpha_sweep) if args.alpha_sweep else None
    if alphas and not args.adapter:
        raise SurgeryError("--alpha-sweep needs --adapter (it rescales that adapter at run time)")
    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    judge_specs = args.judge or (spec.judges if spec else "profanity")
    judges = load_judges(judge_specs, data_dir=args.data_dir)  # judges first: a bad one fails before the model loads
    model, tok = _load(args)
    record = None
    if args.adapter:
        from .adapter import load_edited
        from .stack import is_stack, load_stack

        if is_stack(args.adapter):
            if alphas:
                raise SurgeryError(
                    "--alpha-sweep rescales one adapter; a stack has several (evaluate each adapter folder)"
                )
            model = load_stack(model, args.adapter, force=args.force)
        else:
            model = load_edited(model, args.adapter, force=args.force)
            record = model.surgery_records["default"]
    settings = EvalSettings(
        judges=judges,
        limit=args.limit,
        start=args.start,
        ppl_limit=args.ppl_limit,
        benign_start=args.benign_start,
        toxigen_groups=toxigen_groups(args.toxigen_groups),
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        samples=args.samples,
        seed=args.seed,
        chat_template=chat,
    )
    # --behavior without --start: each suite on its report split (data/splits.py), as the README reports it
    per_suite = None
    if spec and args.start is None:
        per_suite = report_settings(suites, judges, args.data_dir, args.limit, args.ppl_limit, args.seed)
        for suite_settings in per_suite.values():  # the options that are not about which prompts
            suite_settings.batch_size, suite_settings.max_new_tokens, suite_settings.chat_template = (
                args.batch_size,
                args.max_new_tokens,
                chat,
            )

    def run():
        if per_suite is None:
            return evaluate(model, tok, suites, dataclasses.replace(settings, start=args.start or 0))
        return evaluate_report(model, tok, per_suite)

    meta = {
        "model": args.model,
        "adapter": args.adapter,
        "judges": [j.name for j in judges],
        "behavior": spec.name if spec else None,
    }

    def headline(results: dict) -> dict | None:
        if spec is None or spec.metric[0] not in results["suites"]:
            return None
        suite, key = spec.metric
        from .evaluation.protocols import PROTOCOLS

        values = metric_values(results["suites"][suite], PROTOCOLS[suite].metric(key))
        return {"suite": suite, "key": key, "values": {j: v for j, (v, _) in values.items()}}

    if not alphas:
        results, samples = run()
        results.update(meta, alpha=record["alpha"] if record else None, metric=headline(results))
        write_run(args.out, results, samples)
        print(json.dumps(results["suites"], indent=1))
        return
    from .adapter import set_alpha
    from .evaluation.runner import write_alpha_sweep

    runs = []
    for alpha in alphas:  # one model load: PEFT's LoRA scaling sets each alpha exactly
        set_alpha(model, alpha)
        results, samples = run()
        results.update(meta, alpha=alpha, metric=headline(results))
        write_run(Path(args.out) / f"alpha_{alpha:g}", results, samples)
        runs.append(results)
    write_alpha_sweep(args.out, runs)
    for r in runs:
        print(
            f"alpha {r['alpha']:g}: "
            + json.dumps(
                {k: {m: v for m, v in s.items() if isinstance(v, (int, float))} for k, s in r["suites"].items()}
            )
        )


def cmd_merge(args) -> None:
    from .adapter import merge_into
    from .models import save_model

    model, tok = _load(args)
    merge_into(model, args.adapter, force=args.force)
    save_model(model, tok, args.out, source={"base_model": args.model, "adapter": str(args.adapter)})
    print(f"merged model -> {args.out}")


def cmd_tune(args) -> None:
    import yaml

    from .evaluation.protocols import behavior
    from .tune import TUNABLE_SUITES, TuneSettings, check_space, default_space, tune

    spec = behavior(args.behavior)
    suites = tuple(s.strip() for s in args.suites.split(",") if s.strip()) if args.suites else spec.tune_suites
    if not suites or set(suites) - set(TUNABLE_SUITES):
        raise SurgeryError(
            f"--suites takes {', '.join(TUNABLE_SUITES)} (the undesired objective), got '{args.suites}'"
        )
    space = None
    if args.space:
        try:
            space = check_space(yaml.safe_load(Path(args.space).read_text()))
        except (OSError, yaml.YAMLError) as err:
            raise SurgeryError(f"cannot read the search space {args.space}: {first_line(err)}") from err
    hp = _hparams(args)
    model, tok = _load(args, hp)
    from . import architectures

    settings = TuneSettings(
        model=args.model,
        base_hparams=hp.to_dict(),
        space=space or default_space(len(architectures.decoder_layers(model)), spec.probe_data_choices),
        trials=args.trials,
        limit=args.limit,
        benign_limit=args.benign_limit,
        suites=suites,
        judges=tuple(j.strip() for j in (args.judge or spec.judges).split(",") if j.strip()),
        max_ppl_increase=args.max_ppl_increase,
        max_kl=args.max_kl,
        seed=args.seed,
        data_dir=args.data_dir,
        validation_limit=args.validation_limit,
        stack_on=args.stack_on,
    )
    result = tune(model, tok, settings, args.out)
    chosen = result["chosen"]
    print(f"chosen: trial {chosen['trial']} -> {result['chosen_yaml']}")
    print("tuning:     " + json.dumps(chosen["tuning"]["values"]))
    print("validation: " + json.dumps(chosen["validation"]))


def _parse_sets(items: list[str]) -> dict[str, dict]:
    """``--set METHOD.KEY=VALUE`` (YAML value) -> ``{method: {key: value}}``."""
    import yaml

    overrides: dict[str, dict] = {}
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            raise SurgeryError(f"--set takes METHOD.KEY=VALUE (e.g. rome.v_num_grad_steps=5), got '{item}'")
        try:
            overrides.setdefault(method, {})[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SurgeryError(f"--set {item}: the value is not YAML ({str(err).splitlines()[0]})") from err
    return overrides


def cmd_compare(args) -> int:
    from .compare import (
        CompareConfig,
        failed_methods,
        parse_compare_suites,
        parse_methods,
        result_table,
        run_compare,
    )

    config = CompareConfig(
        out=args.out,
        model=args.model,
        methods=parse_methods(args.methods),
        suites=parse_compare_suites(args.suite),
        judges=args.judge,
        records=args.records,
        limit=args.limit,
        ppl_limit=args.ppl_limit,
        rtp_start=args.rtp_start,
        toxigen_start=args.toxigen_start,
        benign_start=args.benign_start,
        alphas=tuple(_parse_alphas(args.alphas)) if args.alphas.strip() else (),
        data_dir=args.data_dir,
        hparams_dir=args.hparams_dir,
        overrides=_parse_sets(args.set),
        device=args.device,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        overwrite=args.overwrite,
        command="surgery " + shlex.join(sys.argv[1:]),
        **({"instruction": args.instruction} if args.instruction else {}),
    )
    result = run_compare(config)
    print(f"\n{result_table(result)}\n\nwritten to {args.out}/ (compare.json, compare.md, tradeoff.png, edits/)")
    failed = failed_methods(result)
    if failed:
        print(f"surgery: {len(failed)} method(s) failed: {', '.join(failed)} (see compare.md)", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(
        out_dir=args.out,
        limit=args.limit,
        data_dir=args.data_dir,
        hparams_path=args.hparams,
        model_name=args.model,
        behavior_name=args.behavior,
    )


def cmd_stack(args) -> None:
    from .demo import hparams_for
    from .evaluation.protocols import behavior
    from .hparams import SurgeryHyperParams
    from .stack import build_stack, export_stack

    names = [b.strip() for b in args.behaviors.split(",") if b.strip()]
    if len(names) < 2:
        raise SurgeryError(f"--behaviors takes two or more behaviors, got '{args.behaviors}'")
    for name in names:
        behavior(name)
    steps = [(name, SurgeryHyperParams.from_hparams(hparams_for(args.model, name))) for name in names]
    model, tok = _load(args, steps[0][1])
    built = build_stack(model, tok, steps, sequential=args.sequential, data_dir=args.data_dir)
    out = export_stack(
        built, model, args.out, base_model_name=args.model, sequential=args.sequential, overwrite=args.overwrite
    )
    how = "sequential: each probe trained on the model edited before it" if args.sequential else "independent probes"
    print(f"stack -> {out}  {', '.join(names)} ({how})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="surgery", description="Model Surgery: edit MLP gate rows along a behavior probe.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and the chain of causes of an error"
    )
    parser.add_argument(
        "--threads",
        type=POSITIVE_INT,
        default=None,
        help="CPU threads for torch (default: $SURGERY_THREADS, else torch's own choice); on a busy machine "
        "fewer threads than cores is often faster",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, model=True):
        if model:
            p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, or smollm2-135m (embedded)")
            p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
            p.add_argument(
                "--device",
                default=None,
                help="cpu, cuda, cuda:N, mps (default: the hparams' device for probe/edit, else the CPU)",
            )
            p.add_argument(
                "--device-map",
                choices=["auto"],
                default=None,
                help="auto: accelerate spreads the model over every visible GPU, then CPU memory "
                "(default for probe/edit: auto when the hparams say model_parallel)",
            )
        p.add_argument(
            "--data-dir", default=None, help="local data folder (default: $SURGERY_DATA_DIR, then ../shared/data)"
        )

    p = sub.add_parser("model-path", help="print the local HF folder of a model alias")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_model_path)

    p = sub.add_parser("tasks-path", help="print the folder of the lm-eval tasks (for lm_eval --include_path)")
    p.set_defaults(func=cmd_tasks_path)

    behaviors = "toxicity (default), jailbreak, attitude"

    p = sub.add_parser("probe", help="train a behavior probe")
    common(p)
    p.add_argument("--behavior", default="toxicity", help=behaviors)
    p.add_argument(
        "--data",
        default=None,
        help="davidson, toxigen, rtp, self, sst2, safeedit, a.csv/.jsonl with text,label, or several joined "
        "by + (default: the hparams', else the behavior's)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--hparams", default=None, help="YAML whose probe_* settings to use (default: the model's)")
    p.add_argument("--layer", type=_number(int), default=None, help="hidden-state index (-1 = final normed state)")
    p.add_argument("--pooling", choices=["mean", "last"], default=None)
    p.add_argument("--max-per-class", type=POSITIVE_INT, default=None)
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("edit", help="compute the surgery and write it as a PEFT LoRA adapter")
    common(p)
    p.add_argument("--behavior", default="toxicity", help=behaviors)
    p.add_argument("--probe", required=True)
    p.add_argument(
        "--hparams", default=None, help="default: hparams/Surgery/<model>.yaml (toxicity) or <model>-<behavior>.yaml"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--alpha", type=FINITE, default=None, help="override the YAML's alpha")
    p.add_argument(
        "--top-k",
        type=_number(float, 0, low_open=True),
        default=None,
        help="override the YAML's top_k (count, or fraction < 1)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--streaming",
        action="store_true",
        help="read only the gate tensors from the safetensors shards, never building the model "
        "(automatic when the model would not fit in free memory)",
    )
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("eval", help="evaluate a model, optionally with a surgery adapter (or a stack)")
    common(p)
    p.add_argument("--adapter", default=None, help="a surgery adapter folder, or a stack made by `surgery stack`")
    p.add_argument(
        "--behavior",
        default=None,
        help=f"{behaviors}: its suites and judges, each suite on its report split unless --start is given",
    )
    p.add_argument(
        "--suite",
        default=None,
        help="comma-separated: rtp, toxigen, safeedit, advbench, false_refusal, attitude, ppl, kl, or an lm-eval task "
        "(default: the behavior's, else rtp,ppl)",
    )
    p.add_argument(
        "--judge",
        default=None,
        help="comma-separated judges: profanity, minilm, detoxify[:original|unbiased|multilingual|/path.ckpt], "
        "hf:<id or folder>[#label=N], perspective (needs PERSPECTIVE_API_KEY), refusal, vader, minilm:sst2 "
        "(default: the behavior's, else profanity)",
    )
    p.add_argument(
        "--limit",
        type=POSITIVE_INT,
        default=None,
        help="prompts (records) per generation suite; examples per lm-eval task",
    )
    p.add_argument(
        "--start",
        type=NON_NEGATIVE_INT,
        default=None,
        help="first prompt index (keep tuning and reporting prompts apart)",
    )
    p.add_argument("--ppl-limit", type=POSITIVE_INT, default=200, help="benign documents for ppl and kl")
    p.add_argument("--benign-start", type=NON_NEGATIVE_INT, default=0, help="first benign document for ppl and kl")
    p.add_argument(
        "--toxigen-groups",
        default="all",
        help="toxigen: all, report (the held-out groups of data/splits.py), probe, or g1,g2,...",
    )
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    p.add_argument(
        "--samples",
        type=_number(int, 2),
        default=None,
        help="rtp: also k >= 2 nucleus samples per prompt (top-p 0.9, seeded) -> expected maximum toxicity "
        "(Gehman et al. use 25)",
    )
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="sampling seed (--samples) and lm-eval seeds")
    p.add_argument(
        "--max-new-tokens",
        type=POSITIVE_INT,
        default=None,
        help="override every suite's protocol default (rtp 20, toxigen 30, safeedit 128, advbench 64)",
    )
    p.add_argument(
        "--chat-template",
        choices=["auto", "on", "off"],
        default="auto",
        help="safeedit/advbench: wrap prompts in the tokenizer's chat template (auto: when it has one)",
    )
    p.add_argument("--force", action="store_true", help="load an adapter whose base-weight fingerprint differs")
    p.add_argument(
        "--alpha-sweep", default=None, help="e.g. 0,0.5,1,2: evaluate the adapter at each alpha with one model load"
    )
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="write a standalone model folder with the adapter merged in")
    common(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("tune", help="multi-objective search of the edit's knobs (Optuna): front + chosen YAML")
    common(p)
    p.add_argument("--hparams", default=None, help="the YAML whose other settings the search starts from")
    p.add_argument("--trials", type=POSITIVE_INT, default=40)
    p.add_argument(
        "--limit", type=POSITIVE_INT, default=100, help="RTP tuning prompts per trial (rtp/toxic.jsonl[0:200])"
    )
    p.add_argument("--benign-limit", type=POSITIVE_INT, default=100, help="benign documents per trial for kl and ppl")
    p.add_argument("--behavior", default="toxicity", help=behaviors)
    p.add_argument(
        "--suites",
        default=None,
        help="the undesired objective: rtp, toxigen (probe-side groups), advbench, attitude "
        "(default: toxicity rtp,toxigen; jailbreak advbench; attitude attitude)",
    )
    p.add_argument(
        "--judge", default=None, help="judges of the undesired objective (averaged; default: the behavior's)"
    )
    p.add_argument(
        "--max-ppl-increase",
        type=_number(float, 0, low_open=True),
        default=0.10,
        help="constraint on the chosen point: relative token perplexity increase",
    )
    p.add_argument("--max-kl", type=_number(float, 0, low_open=True), default=None, help="constraint: mean KL")
    p.add_argument(
        "--space", default=None, help="YAML of knob -> {choices: [...]} or {low, high, log}; default: see tune.py"
    )
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument(
        "--validation-limit",
        type=POSITIVE_INT,
        default=200,
        help="RTP validation prompts for the chosen point (rtp/toxic.jsonl[300:500])",
    )
    p.add_argument(
        "--stack-on",
        default=None,
        help="a surgery adapter folder active in every trial: search the next edit of a stack (e.g. a second "
        "behavior on top of the shipped toxicity edit); objectives and constraints count both edits",
    )
    p.add_argument("--out", required=True, help="TUNE_DIR: study.db (resumable), front.json, front.png, chosen.yaml")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("stack", help="edit several behaviors at once: a named stack of adapters")
    common(p)
    p.add_argument("--behaviors", required=True, help="e.g. toxicity,jailbreak (each with its shipped YAML)")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="the paper's recipe: each probe is trained on the model edited by the behaviors before it",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser(
        "compare",
        help="Surgery vs. EasyEdit's DINM, ROME, FT-L, FT-M and a safety prompt: one table, one trade-off plot",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, or smollm2-135m (embedded)")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N (default: the CPU; EasyEdit's methods: their YAML's device)"
    )
    p.add_argument("--methods", default="surgery,dinm,rome,ft-l,ft-m,prompt", help="comma-separated, any of these")
    p.add_argument(
        "--suite",
        default="rtp,toxigen,safeedit,ppl,kl",
        help="rtp, toxigen, advbench, ppl, kl judge the global edit; safeedit is the per-instance protocol",
    )
    p.add_argument("--judge", default="profanity,minilm", help="comma-separated judges, as in `surgery eval`")
    p.add_argument(
        "--records",
        type=POSITIVE_INT,
        default=2,
        help="N: SafeEdit records [0, N) edit every method's global edit; [N, 2N) are the per-instance protocol's",
    )
    p.add_argument("--limit", type=POSITIVE_INT, default=50, help="prompts per generation suite")
    p.add_argument(
        "--ppl-limit", type=POSITIVE_INT, default=None, help="benign documents for ppl and kl (default: --limit)"
    )
    p.add_argument(
        "--rtp-start", type=NON_NEGATIVE_INT, default=500, help="first RTP prompt (the report split: 500-799)"
    )
    p.add_argument("--toxigen-start", type=NON_NEGATIVE_INT, default=0)
    p.add_argument(
        "--benign-start", type=NON_NEGATIVE_INT, default=0, help="first benign document (the report split: 0-199)"
    )
    p.add_argument(
        "--alphas", default="0.25,0.5,1.0", help="Surgery's alpha curve (set_alpha on the shipped edit); '' for none"
    )
    p.add_argument("--instruction", default=None, help="the prompt baseline's safety instruction (default: Llama 2's)")
    p.add_argument(
        "--data-dir", default=None, help="local data folder (default: $SURGERY_DATA_DIR, then ../shared/data)"
    )
    p.add_argument(
        "--hparams-dir",
        default=None,
        help="a folder in EasyEdit's layout (<dir>/Surgery|DINM|ROME|FT/<name>.yaml) instead of the shipped hparams",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override one hyperparameter of one method, e.g. rome.v_num_grad_steps=5 or surgery.alpha=0.85",
    )
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None, help="override every suite's protocol default")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier compare in --out")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="probe -> edit -> eval (base and edited) on an embedded model; writes runs/demo")
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default) or gemma3-270m")
    p.add_argument("--behavior", default="toxicity", help=behaviors)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="RTP prompts (default: the demo's held-out set)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--hparams", default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def _env_threads() -> int | None:
    text = os.environ.get("SURGERY_THREADS", "").strip()
    if not text:
        return None
    try:
        return POSITIVE_INT(text)
    except argparse.ArgumentTypeError as err:
        raise SystemExit(f"surgery: error: SURGERY_THREADS {err}") from err


def _print_error(err: BaseException, verbose: bool) -> None:
    print(f"surgery: error: {err}", file=sys.stderr)
    if verbose:
        traceback.print_exception(err, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    threads = args.threads or _env_threads()
    if threads:
        import torch  # the CLI imports torch lazily so `--help` stays fast

        torch.set_num_threads(threads)
    try:
        code = args.func(args)
    except SurgeryError as err:
        _print_error(err, args.verbose)
        return 2
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
