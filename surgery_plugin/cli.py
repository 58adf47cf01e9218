"""The ``surgery`` command: probe -> edit -> eval, plus demo, merge, model-path and tasks-path.

Bad input ends with one line, ``surgery: error: ...`` and exit code 2; ``surgery -v ...`` adds
the chain of causes (and debug logging).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from .errors import SurgeryError

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


def _hparams(args):
    from .hparams import SurgeryHyperParams, shipped_hparams_path

    return SurgeryHyperParams.from_hparams(args.hparams or shipped_hparams_path(DEFAULT_MODEL))


def _load(args, hparams=None):
    """The model the command names, on ``--device`` (else the hparams' ``device`` / ``model_parallel``)."""
    from .models import load_model

    device = args.device if args.device is not None else (hparams.device if hparams is not None else None)
    device_map = "auto" if hparams is not None and hparams.model_parallel and args.device is None else None
    return load_model(args.model, dtype=args.dtype, device=device, device_map=device_map)


def cmd_model_path(args) -> None:
    from .models import resolve_model_path

    print(resolve_model_path(args.model))


def cmd_tasks_path(args) -> None:
    from .lm_eval_tasks import tasks_path

    print(tasks_path())


def cmd_probe(args) -> None:
    from .data import load_behavior_data
    from .probe import probe_from_hparams

    hp = _hparams(args)
    changes = {
        "probe_layer": args.layer,
        "pooling": args.pooling,
        "probe_max_per_class": args.max_per_class,
        "seed": args.seed,
    }
    hp = hp.replace(**{k: v for k, v in changes.items() if v is not None})
    data = load_behavior_data(args.data, args.data_dir, hp.probe_max_per_class, hp.seed)
    model, tok = _load(args, hp)
    probe, metrics = probe_from_hparams(model, tok, data, hp)
    probe.save(args.out)
    print(
        f"probe -> {args.out}  layer {probe.metadata['layer']}  held-out accuracy {metrics['test_accuracy']:.4f}  "
        f"AUC {metrics['test_auc']:.4f}  (n_train {metrics['n_train']}, n_test {metrics['n_test']})"
    )


def cmd_edit(args) -> None:
    from .adapter import export_adapter
    from .probe import Probe
    from .provenance import package_versions
    from .surgery import execute_surgery

    hp = _hparams(args)
    hp = hp.replace(**{k: v for k, v in {"alpha": args.alpha, "top_k": args.top_k}.items() if v is not None})
    model, _ = _load(args, hp)
    probe = Probe.load(args.probe, model)
    edit = execute_surgery(model, probe, hp)
    out = export_adapter(
        edit,
        model,
        args.out,
        base_model_name=args.model,
        overwrite=args.overwrite,
        metadata={
            "hparams": hp.to_dict(),
            "probe_file": str(args.probe),
            "probe_sha256": probe.sha256(),
            "versions": package_versions(),
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
    from .evaluation import EvalSettings, evaluate, load_judges, parse_suites, write_run

    suites = parse_suites(args.suite)
    alphas = _parse_alphas(args.alpha_sweep) if args.alpha_sweep else None
    if alphas and not args.adapter:
        raise SurgeryError("--alpha-sweep needs --adapter (it rescales that adapter at run time)")
    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    judges = (
        load_judges(args.judge, data_dir=args.data_dir) if args.judge else []
    )  # judges first: a bad one fails before the model loads
    model, tok = _load(args)
    record = None
    if args.adapter:
        from .adapter import load_edited

        model = load_edited(model, args.adapter, force=args.force)
        record = model.surgery_records["default"]
    settings = EvalSettings(
        judges=judges,
        limit=args.limit,
        start=args.start,
        ppl_limit=args.ppl_limit,
        benign_start=args.benign_start,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        samples=args.samples,
        seed=args.seed,
        chat_template=chat,
    )
    meta = {"model": args.model, "adapter": args.adapter, "judges": [j.name for j in judges]}
    if not alphas:
        results, samples = evaluate(model, tok, suites, settings)
        results.update(meta, alpha=record["alpha"] if record else None)
        write_run(args.out, results, samples)
        print(json.dumps(results["suites"], indent=1))
        return
    from .adapter import set_alpha
    from .evaluation.runner import write_alpha_sweep

    runs = []
    for alpha in alphas:  # one model load: PEFT's LoRA scaling sets each alpha exactly
        set_alpha(model, alpha)
        results, samples = evaluate(model, tok, suites, settings)
        results.update(meta, alpha=alpha)
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

    run_demo(out_dir=args.out, limit=args.limit, data_dir=args.data_dir, hparams_path=args.hparams)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="surgery", description="Model Surgery: edit MLP gate rows along a behavior probe.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and the chain of causes of an error"
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
            "--data-dir", default=None, help="local data folder (default: $SURGERY_DATA_DIR, then ../shared/data)"
        )

    p = sub.add_parser("model-path", help="print the local HF folder of a model alias")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_model_path)

    p = sub.add_parser("tasks-path", help="print the folder of the lm-eval tasks (for lm_eval --include_path)")
    p.set_defaults(func=cmd_tasks_path)

    p = sub.add_parser("probe", help="train a behavior probe")
    common(p)
    p.add_argument("--data", default="davidson", help="davidson, or a .csv/.jsonl with text,label")
    p.add_argument("--out", required=True)
    p.add_argument("--hparams", default=None, help="YAML whose probe_* settings to use (default: the model's)")
    p.add_argument("--layer", type=_number(int), default=None, help="hidden-state index (-1 = final normed state)")
    p.add_argument("--pooling", choices=["mean", "last"], default=None)
    p.add_argument("--max-per-class", type=POSITIVE_INT, default=None)
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("edit", help="compute the surgery and write it as a PEFT LoRA adapter")
    common(p)
    p.add_argument("--probe", required=True)
    p.add_argument("--hparams", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--alpha", type=FINITE, default=None, help="override the YAML's alpha")
    p.add_argument(
        "--top-k",
        type=_number(float, 0, low_open=True),
        default=None,
        help="override the YAML's top_k (count, or fraction < 1)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("eval", help="evaluate a model, optionally with a surgery adapter")
    common(p)
    p.add_argument("--adapter", default=None)
    p.add_argument(
        "--suite",
        default="rtp,ppl",
        help="comma-separated: rtp, toxigen, safeedit, advbench, ppl, or an lm-eval task (mmlu, surgery_rtp, ...)",
    )
    p.add_argument(
        "--judge",
        default="profanity",
        help="comma-separated judges: profanity, minilm, detoxify[:original|unbiased|multilingual|/path.ckpt], "
        "hf:<id or folder>[#label=N], perspective (needs PERSPECTIVE_API_KEY)",
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
        default=0,
        help="first prompt index (keep tuning and reporting prompts apart)",
    )
    p.add_argument("--ppl-limit", type=POSITIVE_INT, default=200, help="benign documents for ppl and kl")
    p.add_argument("--benign-start", type=NON_NEGATIVE_INT, default=0, help="first benign document for ppl and kl")
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
    p.add_argument("--rtp-start", type=NON_NEGATIVE_INT, default=500, help="first RTP prompt (the tuning used 0-299)")
    p.add_argument("--toxigen-start", type=NON_NEGATIVE_INT, default=0)
    p.add_argument(
        "--benign-start", type=NON_NEGATIVE_INT, default=200, help="first benign document (the tuning used 0-99)"
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

    p = sub.add_parser("demo", help="probe -> edit -> eval (base and edited) on SmolLM2; writes runs/demo")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="RTP prompts (default: the demo's held-out set)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--hparams", default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def _print_error(err: BaseException, verbose: bool) -> None:
    print(f"surgery: error: {err}", file=sys.stderr)
    if verbose:
        traceback.print_exception(err, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
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
