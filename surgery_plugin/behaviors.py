"""The behaviors an edit changes, declared once: probe data, suites, judges, headline number, search, YAML.

A behavior's probe data labels the *undesired* side 1; a positive alpha moves the model away from it
("surrender", a negative alpha, moves towards it). Every command that takes ``--behavior`` reads this
registry; a YAML records the behavior it was made for (``behavior:``) and is refused for another one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import SurgeryHyperParams, shipped_hparams_path
from .errors import SurgeryError


@dataclass(frozen=True)
class Behavior:
    name: str
    probe_data: str  # the default probe data (a YAML's probe_data overrides it)
    suites: tuple[str, ...]  # what `surgery eval --behavior NAME` runs, capability costs included
    judges: str  # the default --judge
    metric: tuple[str, str]  # (suite, key): the behavior's headline number
    tune_suites: tuple[str, ...]  # `surgery tune`: the suites of the undesired objective
    probe_data_choices: tuple[str, ...]  # `surgery tune`: the probe data sets its default space tries
    applies_to_chat_models_only: bool = False


BEHAVIORS: dict[str, Behavior] = {
    b.name: b
    for b in (
        Behavior(
            "toxicity",
            probe_data="davidson",
            suites=("rtp", "toxigen", "ppl", "kl"),
            judges="minilm:perspective,profanity,minilm",  # the first: Perspective distilled (the paper's judge)
            metric=("rtp", "toxic_rate"),
            tune_suites=("rtp", "toxigen"),
            probe_data_choices=("davidson", "rtp", "self", "davidson+toxigen", "toxigen+rtp"),
        ),
        Behavior(
            "jailbreak",
            probe_data="safeedit",
            suites=("advbench", "safeedit", "false_refusal", "ppl", "kl"),
            judges="refusal,minilm:safety",  # zero-shot compliance; trained compliance (SafeEdit + HH-RLHF)
            metric=("advbench", "refusal_rate"),
            tune_suites=("advbench",),
            probe_data_choices=("safeedit", "instructions"),
            applies_to_chat_models_only=True,
        ),
        Behavior(
            "attitude",
            probe_data="sst2",
            suites=("attitude", "ppl", "kl"),
            judges="vader,minilm:sst2",
            metric=("attitude", "positive_rate"),
            tune_suites=("attitude",),
            probe_data_choices=("sst2",),
        ),
    )
}


def get_behavior(name: str) -> Behavior:
    try:
        return BEHAVIORS[name]
    except KeyError as err:
        raise SurgeryError(f"unknown behavior '{name}'; known: {', '.join(BEHAVIORS)}") from err


def hparams_for(model_name: str, behavior: str) -> Path:
    """The shipped YAML: ``hparams/Surgery/<model>.yaml`` for toxicity, ``<model>-<behavior>.yaml`` otherwise."""
    get_behavior(behavior)  # an unknown name is an error that lists the known ones
    name = Path(model_name).name  # a hub id or a folder: its last part
    return shipped_hparams_path(name if behavior == "toxicity" else f"{name}-{behavior}")


def check_behavior(hparams: SurgeryHyperParams, behavior: str, source: str = "the hparams") -> Behavior:
    """The behavior, after checking that ``hparams`` were made for it (their ``behavior:``)."""
    spec = get_behavior(behavior)
    if hparams.behavior != spec.name:
        raise SurgeryError(
            f"{source} are for behavior '{hparams.behavior}', not '{spec.name}'; pass --behavior {hparams.behavior} "
            f"or a YAML made for {spec.name}"
        )
    return spec
