"""``surgery tune``: a multi-objective search of an edit's knobs.

| module | job |
|---|---|
| ``space`` | the knobs (declared once, from the hparams' own rules), sampling, a point -> hparams |
| ``study`` | the Optuna study: trials on the tuning splits, resume policy, validation, chosen YAML |
| ``report`` | the front, each trial's record, the plot |
"""

from __future__ import annotations

import json

from torch import nn

from ...behaviors import get_behavior
from ...config import SurgeryHyperParams, load_yaml_mapping, parse_list
from ...core import architectures
from ...io.files import check_target
from .space import check_space, default_space
from .study import TUNABLE_SUITES, TuneSettings, tune


def tune_inputs(args) -> dict:
    """The behavior, the check of ``--out``, the objective suites, the judges and the space of ``surgery tune``,
    checked before any model loads (the default space, which needs the model's depth, comes later)."""
    behavior = get_behavior(args.behavior)
    check_target(args.out, "tune", overwrite=True)  # a study there resumes; any other folder is left alone
    if args.suites:
        suites = parse_list(args.suites, "suite", known=TUNABLE_SUITES, hint=" (the undesired objective)")
    else:
        suites = behavior.tune_suites
    space = check_space(load_yaml_mapping(args.space, "search space")) if args.space else None
    return {
        "behavior": behavior,
        "suites": tuple(suites),
        "space": space,
        "judges": parse_list(args.judge or behavior.judges, "judge"),
    }


def run_tune(model: nn.Module, tokenizer, args, hparams: SurgeryHyperParams, inputs: dict | None = None) -> dict:
    """``surgery tune`` with the parsed command line: the behavior's suites, judges and data choices by default."""
    inputs = inputs or tune_inputs(args)
    behavior, space = inputs["behavior"], inputs["space"]
    settings = TuneSettings(
        model=args.model,
        base_hparams=hparams.to_dict(),
        space=space or default_space(len(architectures.decoder_layers(model)), behavior.probe_data_choices),
        trials=args.trials,
        limit=args.limit,
        benign_limit=args.benign_limit,
        suites=inputs["suites"],
        judges=inputs["judges"],
        objective=args.objective,
        samples=args.samples,
        validation_samples=args.validation_samples or 0,
        validation_controls=args.validation_controls,
        max_ppl_increase=args.max_ppl_increase,
        max_kl=args.max_kl,
        seed=args.seed,
        data_dir=args.data_dir,
        validation_limit=args.validation_limit,
        stack_on=args.stack_on,
    )
    result = tune(model, tokenizer, settings, args.out)
    chosen = result["chosen"]
    print(f"chosen: trial {chosen['trial']} -> {result['chosen_yaml']}")
    print("tuning:     " + json.dumps(chosen["tuning"]["values"]))
    print("validation: " + json.dumps(chosen["validation"]))
    return result


__all__ = ["TUNABLE_SUITES", "TuneSettings", "check_space", "default_space", "run_tune", "tune", "tune_inputs"]
