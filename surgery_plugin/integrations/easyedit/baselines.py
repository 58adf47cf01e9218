"""EasyEdit's own editing algorithms as baselines of ``surgery compare``: DINM, ROME, FT-L, FT-M.

Nothing is re-implemented here. Each edit is EasyEdit's algorithm, called the way EasyEdit's
:class:`SafetyEditor` calls it (``editor.apply_algo(model, tok, [request], hparams, copy=False,
return_orig_weights=True, keep_original_weight=True)``), on an editor built from the
``(model, tokenizer)`` pair both of EasyEdit's editors accept, with requests made by the editor's
own ``_prepare_requests``. ``SafetyEditor.edit`` itself is not used, for four reasons found on
EasyEdit 14cea82 (docs/easyedit.md):

- the model it returns is already restored, so an edited model cannot be judged or kept;
- it writes DINM's located layer into ``hparams.layers`` and never clears it, so every later
  instance is edited at the first instance's layer (here: located per instance, see :meth:`edit`);
- its metrics are generated texts, not scores (the SafeEdit classifier lives in an example script);
- it drops ``subject``, which ROME needs (here: the record's question, a substring of its prompt).

What the caller does on top, all documented where it happens: the SafeEdit record becomes EasyEdit's
request (prompt = adversarial prompt, target_new = safe generation, ground_truth = unsafe
generation, locality = the record's knowledge constraint, general prompts = its four
generalisation inputs), DINM's edit request gets DINM's system suffix (EasyEdit's
``examples/run_safety_editing.py``), ROME's prompt is a template with ``{}`` for the subject and
its other braces escaped (ROME formats prompts with ``str.format``), and EasyEdit's prints go to
a log file.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...config import find_hparams
from ...core.edit import revert_edit
from ...data.loaders import safeedit_edit_inputs
from ...errors import SurgeryError, first_line
from . import easyeditor_modules, register
from .patches import load_for_editor
from .rome_stats import prepare_local_stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Baseline:
    """One EasyEdit algorithm as a compare method."""

    name: str  # the method name of `surgery compare`
    alg_name: str  # EasyEdit's ALG_DICT key
    hparams_dir: str  # hparams/<hparams_dir>/<model>.yaml (EasyEdit's layout)
    hparams_module: str  # where EasyEdit defines its hyperparameter class
    hparams_class: str
    low_rank: bool  # the change of each edited matrix has rank <= the number of edits: saved as a PEFT LoRA
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)  # set on top of the YAML for this method


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline(
            "dinm",
            "DINM",
            "DINM",
            "easyeditor.models.dinm",
            "DINMHyperParams",
            low_rank=False,
            description="DINM (Wang et al. 2024): locates the layer whose hidden states differ most between the safe "
            "and the unsafe reply, then tunes its MLP down projection towards the safe reply under a KL constraint "
            "on the record's knowledge question",
        ),
        Baseline(
            "rome",
            "ROME",
            "ROME",
            "easyeditor.models.rome",
            "ROMEHyperParams",
            low_rank=True,
            description="ROME (Meng et al. 2022): a rank-one update of one MLP down projection that maps the subject "
            "(the record's question) to the safe reply, along C^-1 k with C the second moment of that projection's "
            "inputs (mom2_dataset: local_text: Alpaca instructions, see rome_stats; mom2_adjustment: false: "
            "without C)",
        ),
        Baseline(
            "ft-l",
            "FT",
            "FT",
            "easyeditor.models.ft",
            "FTHyperParams",
            low_rank=False,
            description="FT-L: fine-tunes one MLP down projection on the safe reply's tokens after the last prompt "
            "token (objective_optimization: prompt_last, the ROME paper's FT)",
            overrides={"objective_optimization": "prompt_last"},
        ),
        Baseline(
            "ft-m",
            "FT",
            "FT",
            "easyeditor.models.ft",
            "FTHyperParams",
            low_rank=False,
            description="FT-M: fine-tunes one MLP down projection on the whole safe reply, teacher-forced "
            "(objective_optimization: target_new, EasyEdit's survey)",
            overrides={"objective_optimization": "target_new"},
        ),
    )
}


def load_hparams(
    baseline: Baseline,
    model_name: str,
    hparams_root: str | os.PathLike | None = None,
    overrides: dict | None = None,
    device: str | None = None,
):
    """EasyEdit's hyperparameter object for ``baseline`` and ``model_name``, from ``hparams/<dir>/`` (or
    ``hparams_root``), read by EasyEdit's own class; ``overrides`` on top (an unknown key is a one-line error),
    then ``device`` when given."""
    import importlib

    path = find_hparams(model_name, baseline.hparams_dir, hparams_root)
    cls = getattr(importlib.import_module(baseline.hparams_module), baseline.hparams_class)
    try:
        hparams = cls.from_hparams(str(path))
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise SurgeryError(f"{path} is not a valid {baseline.hparams_class} file ({first_line(err)})") from err
    changes = {**baseline.overrides, **(overrides or {})}
    known = {f.name for f in dataclasses.fields(hparams)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise SurgeryError(
            f"unknown {baseline.name} hyperparameter '{unknown[0]}' (from --set); {baseline.hparams_class} has: "
            + ", ".join(sorted(known))
        )
    # the model is handed over loaded; EasyEdit still reads model_name (FT: 't5' in model_name.lower())
    hparams = dataclasses.replace(hparams, **changes, model_name=model_name)
    if device is not None:
        hparams.device = device
    hparams.source = str(path)  # not a dataclass field: recorded with the results, never passed on
    return hparams


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def rome_prompt(prompt: str, subject: str) -> str:
    """ROME's prompt template: the first occurrence of ``subject`` as ``{}``, every other brace escaped
    (ROME fills the template with ``str.format``; 5 of SafeEdit's first 93 prompts hold braces)."""
    before, found, after = prompt.partition(subject)
    if not found:
        raise SurgeryError(f"ROME needs the subject inside the prompt; '{subject[:60]}' is not in it")
    return _escape_braces(before) + "{}" + _escape_braces(after)


class EasyEditBaseline:
    """A loaded model, tokenizer and EasyEdit editor for one baseline; :meth:`edit` applies one request in place."""

    def __init__(self, baseline: Baseline, hparams, workdir: str | os.PathLike, data_dir=None, progress: bool = True):
        register()  # EasyEdit importable (torchvision guard), Surgery registered; a one-line error without it
        self.baseline = baseline
        self.hparams = hparams
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "easyedit.log"
        logging.getLogger("easyeditor").setLevel(logging.WARNING)  # its INFO lines repeat once per editor built
        # what SafetyEditor does when it loads a model itself (float32 unless fp16, output_hidden_states for
        # DINM's layer search), through the package's loader: EasyEdit's LlamaTokenizer would break
        # SmolLM2's tokenizer ("Hello world" -> "Helloworld") and cannot read embedded aliases
        self.model, self.tok = load_for_editor(hparams.model_name, hparams, safety=True)
        self.model.config.output_hidden_states = (
            False  # on only for DINM's layer search (edit); evaluation runs without
        )
        shadow = copy_module.copy(hparams)
        shadow.model_name = (self.model, self.tok)  # the pair both editors accept
        # SafetyEditor writes ./logs/run.log (and prints that it does)
        with contextlib.chdir(self.workdir), self._log() as log, contextlib.redirect_stdout(log):
            self.editor = easyeditor_modules().SafetyEditor(shadow)
        self.editor.hparams = hparams
        self.located_layers: list[int] = []
        # ROME with mom2_dataset: local_text: its covariance statistics from local text (rome_stats)
        self.mom2 = (
            prepare_local_stats(self.model, self.tok, hparams, data_dir, progress)
            if baseline.alg_name == "ROME"
            else None
        )

    def requests(self, records: list[dict]) -> list[tuple[dict, dict]]:
        """``(request, request_for_the_edit)`` per SafeEdit record, made by the editor's ``_prepare_requests``.

        The second differs for DINM (its system suffix after every prompt, as EasyEdit's SafeEdit
        example passes it) and ROME (the prompt as a template, see :func:`rome_prompt`).
        """
        plain = self._prepare(records, suffix="")
        if self.baseline.alg_name == "DINM":
            edited = self._prepare(records, suffix=" " + self.hparams.suffix_system_prompt)
        else:
            edited = [dict(r) for r in plain]
        for record, request in zip(records, edited, strict=True):
            request["subject"] = record["question"]  # SafetyEditor drops it; ROME needs it
            if self.baseline.alg_name == "ROME":
                request["prompt"] = rome_prompt(request["prompt"], record["question"])
        return list(zip(plain, edited, strict=True))

    def _prepare(self, records: list[dict], suffix: str) -> list[dict]:
        inputs = safeedit_edit_inputs(records, suffix=suffix)
        return self.editor._prepare_requests(
            inputs["prompts"],
            inputs["target_new"],
            inputs["ground_truth"],
            inputs["general_prompt"],
            inputs["locality_inputs"],
        )

    def edit(self, request: tuple[dict, dict]) -> dict[str, torch.Tensor]:
        """Apply one request in place with EasyEdit's algorithm; returns ``{param_name: weight before}``.

        DINM: ``hparams.layers: []`` means "locate per instance", so the layer is located for this
        request with ``SafetyEditor._locate_toxic_layer`` (on the model as it is now) and cleared
        afterwards; a YAML with explicit layers keeps them.
        """
        plain, edited = request
        locate = self.baseline.alg_name == "DINM" and not self.hparams.layers
        if locate:
            self.model.config.output_hidden_states = True  # the layer search reads them (SafetyEditor loads so)
            try:
                self.hparams.layers = self.editor._locate_toxic_layer(self.model, self.tok, [plain])
            finally:
                self.model.config.output_hidden_states = False
            self.located_layers += list(self.hparams.layers)
        try:
            with self._log() as log, contextlib.redirect_stdout(log):
                _, weights_copy = self.editor.apply_algo(
                    self.model,
                    self.tok,
                    [edited],
                    self.hparams,
                    copy=False,
                    return_orig_weights=True,
                    keep_original_weight=True,
                    train_ds=None,
                )
        finally:
            if locate:
                self.hparams.layers = []
        if not weights_copy:
            raise SurgeryError(f"EasyEdit's {self.baseline.alg_name} returned no original weights; cannot restore")
        return weights_copy

    def _log(self):
        """EasyEdit's prints go to ``easyedit.log`` in the work folder."""
        return open(self.log_path, "a", encoding="utf-8")

    def restore(self, weights_copy: dict[str, torch.Tensor]) -> None:
        """Write the weights back (bitwise), as EasyEdit's editors do after a non-sequential edit."""
        revert_edit(self.model, weights_copy)
