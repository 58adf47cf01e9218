"""The ``surgery`` command: probe -> edit -> eval, plus demo, merge, model-path and tasks-path.

Bad input ends with one line, ``surgery: error: ...`` and exit code 2; ``surgery -v ...`` adds
the chain of causes (and debug logging).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import traceback
from typing import NoReturn

from ..errors import SurgeryError, first_line

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
    """``--hparams``, else the shipped YAML of ``--model`` and ``--behavior`` (``<model>[-<behavior>].yaml``);
    checked to be made for ``--behavior``."""
    from ..behaviors import check_behavior, hparams_for
    from ..config import SurgeryHyperParams

    behavior = getattr(args, "behavior", None) or "toxicity"
    if args.hparams:
        hp = SurgeryHyperParams.from_hparams(args.hparams)
        source = args.hparams
    else:
        try:
            source = hparams_for(args.model, behavior)
        except SurgeryError:
            if required:
                raise
            return SurgeryHyperParams(model_name=args.model, behavior=behavior)
        hp = SurgeryHyperParams.from_hparams(source)
    check_behavior(hp, behavior, str(source))
    return hp


def _load(args, hparams=None, probe_layer=None):
    """The model the command names, on ``--device`` or spread by ``--device-map`` (else the hparams'
    ``device`` / ``model_parallel``); with ``probe_layer`` only the layers its features need."""
    from ..models import load_model

    if args.device is not None and args.device_map is not None:
        raise SurgeryError("--device and --device-map exclude each other; pass one")
    device = args.device if args.device is not None else (hparams.device if hparams is not None else None)
    device_map = args.device_map or (
        "auto" if hparams is not None and hparams.model_parallel and args.device is None else None
    )
    return load_model(args.model, dtype=args.dtype, device=device, device_map=device_map, probe_layer=probe_layer)


def cmd_model_path(args) -> None:
    from ..models import local_model_path

    print(local_model_path(args.model))


def cmd_tasks_path(args) -> None:
    from ..integrations.lm_eval import tasks_path

    print(tasks_path())


def cmd_probe(args) -> None:
    from ..behaviors import get_behavior
    from ..io.files import check_target
    from .edit import needs_whole_model, run_probe

    behavior = get_behavior(args.behavior)
    hp = _hparams(args, required=False)
    changes = {
        "probe_data": args.data or hp.probe_data or behavior.probe_data,
        "probe_layer": args.layer,
        "pooling": args.pooling,
        "probe_max_per_class": args.max_per_class,
        "seed": args.seed,
    }
    hp = hp.replace(**{k: v for k, v in changes.items() if v is not None})
    check_target(args.out, "probe", args.overwrite, what="--out")  # before the work: bad targets fail at once
    if needs_whole_model(hp.probe_data):
        model, tok = _load(args, hp)
    else:
        model, tok = _load(args, hp, probe_layer=hp.probe_layer)
    run_probe(model, tok, hp, behavior, args.out, args.data_dir, args.overwrite)


def cmd_edit(args) -> None:
    from ..behaviors import get_behavior
    from ..core.streaming import CheckpointGates, too_big_to_load
    from ..io.files import check_target
    from ..models import resolve_model_path
    from .edit import run_edit

    behavior = get_behavior(args.behavior)
    hp = _hparams(args)
    hp = hp.replace(**{k: v for k, v in {"alpha": args.alpha, "top_k": args.top_k}.items() if v is not None})
    check_target(args.out, "adapter", args.overwrite)
    path = resolve_model_path(args.model)
    if args.streaming or too_big_to_load(path, args.dtype):
        base, tok = CheckpointGates(path, dtype=args.dtype, name=args.model), None
    else:
        base, tok = _load(args, hp)
    run_edit(base, tok, args.probe, hp, behavior, args.out, args.model, args.overwrite, args.data_dir)


def cmd_eval(args) -> None:
    from ..behaviors import get_behavior
    from ..config import parse_list
    from ..data.splits import toxigen_groups
    from ..evaluation.judges import load_judges
    from ..evaluation.runner import parse_suites
    from ..io.files import check_target
    from .evaluate import eval_plan, run_eval

    behavior = get_behavior(args.behavior) if args.behavior else None
    suites = parse_suites(args.suite or (",".join(behavior.suites) if behavior else "rtp,ppl"))
    alphas = parse_list(args.alpha_sweep, "alpha", convert=FINITE) if args.alpha_sweep else None
    if alphas and not args.adapter:
        raise SurgeryError("--alpha-sweep needs --adapter (it rescales that adapter at run time)")
    if args.paired and (not args.adapter or alphas):
        raise SurgeryError(
            "--paired compares the model with --adapter off and on; pass --adapter (and no --alpha-sweep)"
        )
    if args.controls and not args.paired:
        raise SurgeryError("--controls are measured against the unedited arm: pass --paired")
    if "kl" in suites and not args.adapter:
        raise SurgeryError("the kl suite compares the edited model with the unedited one: pass --adapter")
    if args.start is not None and args.split != "report":
        raise SurgeryError("--split chooses a split of data/splits.py, --start a range of your own: pass one of them")
    if args.start is None and (args.toxigen_groups is not None or args.benign_start is not None):
        raise SurgeryError(
            "--toxigen-groups and --benign-start choose a range of your own: pass --start too (without it "
            "every suite runs on its report split, data/splits.py)"
        )
    check_target(args.out, "paired_run" if args.paired else "sweep" if alphas else "run", args.overwrite)
    judges = load_judges(args.judge or (behavior.judges if behavior else "profanity"), data_dir=args.data_dir)
    settings = eval_plan(  # before the model loads: bad settings fail fast
        suites,
        judges,
        args.data_dir,
        limit=args.limit,
        ppl_limit=args.ppl_limit,
        start=args.start,
        split=args.split,
        benign_start=args.benign_start or 0,
        toxigen_groups=toxigen_groups(args.toxigen_groups),
        **({"batch_size": args.batch_size} if args.batch_size else {}),
        max_new_tokens=args.max_new_tokens,
        samples=args.samples,
        sample_limit=args.sample_limit,
        seed=args.seed,
        chat_template={"auto": None, "on": True, "off": False}[args.chat_template],
    )
    model, tok = _load(args)
    alpha = None
    if args.adapter:
        from ..io.adapter import load_edited
        from ..io.stack import is_stack, load_stack

        if is_stack(args.adapter):
            if alphas:
                raise SurgeryError("--alpha-sweep rescales one adapter; a stack has several (evaluate each adapter)")
            model = load_stack(model, args.adapter, force=args.force)
        else:
            model = load_edited(model, args.adapter, force=args.force)
            alpha = model.surgery_records["default"]["alpha"]
    meta = {
        "model": args.model,
        "adapter": args.adapter,
        "judges": [j.name for j in judges],
        "behavior": behavior.name if behavior else None,
    }
    run_eval(model, tok, settings, args.out, meta, behavior, alpha, alphas, args.overwrite, args.paired, args.controls)


def cmd_merge(args) -> None:
    from ..io.files import check_target
    from .edit import run_merge

    check_target(args.out, "merged_model", args.overwrite)
    model, tok = _load(args)
    run_merge(model, tok, args.adapter, args.out, args.model, args.force, args.overwrite)


def cmd_tune(args) -> None:
    from .tune import run_tune, tune_inputs

    hp = _hparams(args)
    inputs = tune_inputs(args)  # the space, suites and judges checked before the model loads
    model, tok = _load(args, hp)
    run_tune(model, tok, args, hp, inputs)


def cmd_compare(args) -> int:
    from ..config import parse_list
    from .compare import (
        CompareConfig,
        parse_compare_suites,
        parse_methods,
        parse_sample_suites,
        parse_sets,
        run_compare_and_report,
    )

    config = CompareConfig(
        out=args.out,
        model=args.model,
        methods=parse_methods(args.methods),
        suites=parse_compare_suites(args.suite),
        judges=args.judge,
        safety_judges=args.safety_judge,
        records=args.records,
        limit=args.limit,
        ppl_limit=args.ppl_limit,
        samples=args.samples,
        sample_limit=args.sample_limit,
        sample_suites=parse_sample_suites(args.sample_suites),
        controls=args.controls,
        steering_scales=parse_list(args.steering_scales, "steering scale", convert=FINITE),
        tune_limit=args.tune_limit,
        alphas=parse_list(args.alphas, "alpha", convert=FINITE) if args.alphas.strip() else (),
        data_dir=args.data_dir,
        hparams_dir=args.hparams_dir,
        overrides=parse_sets(args.set),
        device=args.device,
        **({"batch_size": args.batch_size} if args.batch_size else {}),
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        overwrite=args.overwrite,
        command="surgery " + shlex.join(args.argv),
        reuse=parse_list(args.reuse, "--reuse run") if args.reuse else (),
        reuse_only=args.reuse_only,
        **({"instruction": args.instruction} if args.instruction else {}),
    )
    return run_compare_and_report(config)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(
        out_dir=args.out,
        limit=args.limit,
        data_dir=args.data_dir,
        hparams_path=args.hparams,
        model_name=args.model,
        behavior_name=args.behavior,
        controls=args.controls,
    )


def cmd_stack(args) -> None:
    from ..behaviors import BEHAVIORS, check_behavior, hparams_for
    from ..config import SurgeryHyperParams, parse_list
    from ..io.files import check_target
    from .stack import run_stack

    names = parse_list(args.behaviors, "behavior", known=tuple(BEHAVIORS))
    if len(names) < 2:
        raise SurgeryError(f"--behaviors takes two or more behaviors, got '{args.behaviors}'")
    steps = []
    for name in names:
        path = hparams_for(args.model, name)
        steps.append((name, SurgeryHyperParams.from_hparams(path)))
        check_behavior(steps[-1][1], name, str(path))
    check_target(args.out, "stack", args.overwrite)
    model, tok = _load(args, steps[0][1])
    run_stack(model, tok, steps, args.out, args.model, args.sequential, args.overwrite, args.data_dir)


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
    p.add_argument("--pooling", choices=["mean", "last", "mean_drop_first"], default=None)
    p.add_argument("--max-per-class", type=POSITIVE_INT, default=None)
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing probe file at --out")
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
        help=f"{behaviors}: its suites and judges",
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
        help="evaluate your own range from this prompt index (default: each suite's report split, data/splits.py)",
    )
    p.add_argument(
        "--split",
        choices=("report", "validation", "tune"),
        default="report",
        help="without --start: which split of data/splits.py every suite runs on (default: report, the prompts no "
        "probe, search or validation saw; validation: to check a searched point)",
    )
    p.add_argument(
        "--ppl-limit",
        type=POSITIVE_INT,
        default=None,
        help="benign documents for ppl and kl (default: the split's 200)",
    )
    p.add_argument(
        "--benign-start",
        type=NON_NEGATIVE_INT,
        default=None,
        help="with --start: the first benign document for ppl and kl (default 0)",
    )
    p.add_argument(
        "--toxigen-groups",
        default=None,
        help="with --start: toxigen's groups: all (default), report (the held-out groups of data/splits.py), "
        "probe, or g1,g2,...",
    )
    p.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        help="rows per forward pass (default: evaluation.protocols.EVAL_BATCH_SIZE, 32)",
    )
    p.add_argument(
        "--samples",
        type=_number(int, 2),
        default=None,
        help="rtp, toxigen, advbench, attitude: also k >= 2 nucleus samples per prompt (top-p 0.9, temperature 1, "
        "seeded and coupled across arms) -> per judge the expected maximum score, the share of prompts with a flagged "
        "sample, the share of samples flagged (Gehman et al. use 25); advbench also the share of samples refused",
    )
    p.add_argument(
        "--sample-limit",
        type=POSITIVE_INT,
        default=None,
        help="with --samples: sample only the first N of each suite's prompts (greedy still runs on --limit of them), "
        "e.g. --limit 300 --samples 25 --sample-limit 100 (default: all)",
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
    p.add_argument("--overwrite", action="store_true", help="replace an earlier eval run at --out")
    p.add_argument(
        "--paired",
        action="store_true",
        help="with --adapter: also the adapter off, on the same prompts and seeds; writes base/, edited/ and the "
        "prompt-by-prompt comparison (paired.json, paired.md, paired.png: changes with 95%% intervals, McNemar p)",
    )
    p.add_argument(
        "--controls",
        type=NON_NEGATIVE_INT,
        default=0,
        help="with --paired: N null edits of the adapter's size (same rows and step, random directions orthogonal "
        "to it, seeds 0..N-1), on the same prompts; the table gets the band of changes they make",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="write a standalone model folder with the adapter merged in")
    common(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a merged model written earlier at --out")
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
        "--judge",
        default=None,
        help="judges (default: the behavior's); the first is the undesired objective's, the others are recorded",
    )
    p.add_argument(
        "--objective",
        choices=("likelihood", "sampled", "greedy"),
        default="likelihood",
        help="likelihood (default): base samples judged once, each trial re-weights them by teacher forcing; "
        "sampled: --samples coupled samples per prompt per trial; greedy: one greedy continuation per prompt",
    )
    p.add_argument(
        "--samples",
        type=_number(int, 2),
        default=8,
        help="samples per tuning prompt (likelihood: of the unedited model, once; sampled: per trial)",
    )
    p.add_argument(
        "--validation-samples",
        type=_number(int, 2),
        default=None,
        help="the chosen point's paired validation also runs the sampled protocol with k samples per prompt",
    )
    p.add_argument(
        "--validation-controls",
        type=NON_NEGATIVE_INT,
        default=0,
        help="the chosen point's paired validation also measures N edits of its size along random directions "
        "(same rows, layers and step; seeds 0..N-1): the band any perturbation of that size gives",
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
    p.add_argument(
        "--methods",
        default="surgery,steering,ablation,dinm,rome,ft-l,ft-m,prompt",
        help="comma-separated, any of these",
    )
    p.add_argument(
        "--suite",
        default="rtp,toxigen,safeedit,ppl,kl",
        help="rtp, toxigen, advbench, ppl, kl judge the global edit; safeedit is the per-instance protocol",
    )
    p.add_argument(
        "--judge",
        default="minilm:perspective,profanity,minilm",
        help="judges of toxic language (rtp, toxigen), comma-separated, as in `surgery eval`",
    )
    p.add_argument(
        "--safety-judge",
        default="minilm:safety,refusal",
        help="judges of compliance with a harmful request (the safeedit suite's DS and DG_*)",
    )
    p.add_argument(
        "--records",
        type=POSITIVE_INT,
        default=2,
        help="N: SafeEdit records [0, N) edit every method's global edit; the report split's first N, [60, 60+N), "
        "are the per-instance protocol's",
    )
    p.add_argument("--limit", type=POSITIVE_INT, default=50, help="prompts per generation suite")
    p.add_argument(
        "--ppl-limit",
        type=POSITIVE_INT,
        default=None,
        help="benign documents for ppl and kl (default: the split's 200)",
    )
    p.add_argument(
        "--alphas", default="0.25,0.5,1.0", help="Surgery's alpha curve (set_alpha on the shipped edit); '' for none"
    )
    p.add_argument(
        "--samples",
        type=POSITIVE_INT,
        default=None,
        help="rtp and toxigen also run the sampled protocol: k nucleus continuations per prompt (25 in the papers)",
    )
    p.add_argument(
        "--sample-limit", type=POSITIVE_INT, default=100, help="the sampled protocol on the first N prompts"
    )
    p.add_argument(
        "--sample-suites",
        default="rtp,toxigen",
        help="the suites that run the sampled protocol with --samples (rtp alone: half the sampling time)",
    )
    p.add_argument(
        "--controls",
        type=NON_NEGATIVE_INT,
        default=0,
        help="same-size random-direction Surgery edits: the null band beside every paired change",
    )
    p.add_argument(
        "--steering-scales",
        default="0.03,0.06,0.12,0.25,0.5",
        help="steering strengths to choose from on the tuning split (fractions of the residual norm)",
    )
    p.add_argument(
        "--tune-limit",
        type=POSITIVE_INT,
        default=50,
        help="tuning-split RTP prompts and benign documents for steering's choice",
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
    p.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        help="rows per forward pass (default: evaluation.protocols.EVAL_BATCH_SIZE, 32)",
    )
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None, help="override every suite's protocol default")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier compare in --out")
    p.add_argument(
        "--reuse",
        default=None,
        metavar="RUN[,RUN]",
        help="take the rows other runs of this comparison (other --methods, same settings) finished, running or not: "
        "a comparison split over processes merges (docs/compare.md)",
    )
    p.add_argument(
        "--reuse-only",
        action="store_true",
        help="measure nothing: write the comparison of the rows already finished (here and in the --reuse runs), "
        "the others left out and named; a look at a split comparison before its parts end",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="probe -> edit -> eval (base and edited) on an embedded model; writes runs/demo")
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default) or gemma3-270m")
    p.add_argument("--behavior", default="toxicity", help=behaviors)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="RTP prompts (default: the demo's held-out set)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--hparams", default=None)
    p.add_argument(
        "--controls",
        type=NON_NEGATIVE_INT,
        default=2,
        help="random-direction edits of the same size, run on the headline suite: the band any such edit gives",
    )
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # how it was run, recorded by the commands that record it
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
    except Exception as err:
        from ..io.files import is_disk_full

        if not is_disk_full(err):
            raise
        _print_error(SurgeryError(f"no space left on the device ({first_line(err)})"), args.verbose)
        return 2
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
