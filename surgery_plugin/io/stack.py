"""Several behaviors at once: named stacks of surgery adapters, and the paper's sequential recipe.

A *stack* is a folder of surgery adapters (one per behavior, in order) and its manifest ``surgery.json``
(``kind: stack``; stacks written before it have ``stack.json``, and still load). Their
rank-1 deltas add, so loading them all onto the base model (:func:`load_stack`, PEFT adapters made
active together) is the same model as applying the edits one after the other in place.

- **Independent** (``sequential=False``): each behavior's probe is trained on the *unedited* model.
- **Sequential** (the paper's multi-attribute recipe): behavior k's probe is trained on the model
  already edited by behaviors 1..k-1, and its rows are selected on those edited weights. Each
  adapter then records the gate fingerprint of the model it was made on, and :func:`load_stack`
  checks every adapter against the base model plus the adapters before it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import SurgeryHyperParams
from ..core import architectures
from ..core.edit import RowUpdate, SurgeryEdit, apply_edit, apply_row_updates, revert_edit
from ..core.probe import Probe
from ..core.provenance import fingerprint_mismatch, gate_fingerprint, package_versions
from ..errors import SurgeryError
from .adapter import ADAPTER_WEIGHTS, load_edited, read_adapter, write_adapter
from .files import output, output_kind, read_manifest, write_manifest

STACK_FILE = "stack.json"


@dataclass
class StackStep:
    name: str  # the behavior (also the PEFT adapter name)
    hparams: SurgeryHyperParams
    probe: Probe
    edit: SurgeryEdit


def export_stack(
    steps: list[StackStep],
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name: str,
    sequential: bool,
    overwrite: bool = False,
) -> Path:
    """One adapter folder per step + the stack's manifest, written whole or not at all."""
    gates = architectures.gates_of(model)
    with output(out_dir, "stack", overwrite) as tmp:
        originals = []
        try:
            for step in steps:
                metadata = {
                    "hparams": step.hparams.to_dict(),
                    "probe_sha256": step.probe.sha256(),
                    "behavior": step.name,
                    "versions": package_versions(),
                }
                (tmp / step.name).mkdir()
                write_adapter(step.edit, gates, tmp / step.name, base_model_name, metadata=metadata)
                if sequential:  # the next adapter's fingerprint is that of the model edited so far
                    originals.append(apply_edit(model, step.edit))
        finally:
            for weights in reversed(originals):
                revert_edit(model, weights)
        record = {
            "format": "surgery_plugin/stack/2",
            "kind": "stack",
            "base_model": base_model_name,
            "sequential": sequential,
            "adapters": [step.name for step in steps],
        }
        write_manifest(tmp, record, names=[])
    return Path(out_dir)


def is_stack(path: str | os.PathLike) -> bool:
    return output_kind(path) == "stack"


def read_stack(stack_dir: str | os.PathLike) -> dict:
    stack_dir = Path(stack_dir)
    legacy = stack_dir / STACK_FILE
    try:
        record = json.loads(legacy.read_text()) if legacy.is_file() else read_manifest(stack_dir, "stack")
        names = list(record["adapters"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SurgeryError(f"{stack_dir} is not a surgery stack (made by `surgery stack`)") from err
    if not names or any(not isinstance(n, str) or "/" in n or n.startswith(".") for n in names):
        raise SurgeryError(f"{stack_dir}: the stack's adapter names are not plain folder names: {names}")
    missing = [n for n in names if not (stack_dir / n / ADAPTER_WEIGHTS).is_file()]
    if missing:
        raise SurgeryError(f"stack {stack_dir} lacks adapter folder(s) {missing}")
    return record


def load_stack(model: nn.Module, stack_dir: str | os.PathLike, names: list[str] | None = None, force: bool = False):
    """The model with the stack's adapters (all, or ``names``) loaded and active together (a ``PeftModel``).

    Every adapter is checked against the base model plus the deltas of the adapters before it in the
    stack, so a stack made for another base model (or a sequential stack out of order) is refused."""
    record = read_stack(stack_dir)
    wanted = names or record["adapters"]
    unknown = [n for n in wanted if n not in record["adapters"]]
    if unknown:
        raise SurgeryError(f"stack {stack_dir} has no adapter {unknown}; it has {record['adapters']}")
    before: list[list[RowUpdate]] = []
    peft_model = model
    for name in record["adapters"]:
        folder = Path(stack_dir) / name
        adapter = read_adapter(folder)
        if record.get("sequential"):
            expected = _fingerprint_with(model, before)
            mismatch = fingerprint_mismatch(adapter.record.get("gate_fingerprint", []), expected)
            if mismatch and not force:
                raise SurgeryError(
                    f"adapter '{name}' of stack {stack_dir} was made on other weights than the base model "
                    f"plus the adapters before it ({mismatch}); is this the stack's base model?"
                )
        if name in wanted:
            # the sequential check above replaces the per-adapter fingerprint check, which knows only the bare base
            peft_model = load_edited(
                peft_model, folder, adapter_name=name, force=force or bool(before and record.get("sequential"))
            )
        before.append(adapter.updates())
    peft_model.base_model.set_adapter(list(wanted), inference_mode=True)
    return peft_model


def _fingerprint_with(model: nn.Module, adapters: list[list[RowUpdate]]) -> list[list[float]]:
    """The gate fingerprint of ``model`` with the given adapters' deltas added (the model is restored bitwise)."""
    base = architectures.unwrap(model)
    originals = []
    try:
        for updates in adapters:
            originals.append(apply_row_updates(base, updates))
        return gate_fingerprint(model)
    finally:
        for weights in reversed(originals):
            revert_edit(base, weights)
