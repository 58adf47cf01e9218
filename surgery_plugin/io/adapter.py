"""The edit as a PEFT LoRA adapter: export, guarded load, alpha at run time, merge, compose.

Per layer the surgery changes the gate weight by ``step * row_mask ⊗ direction`` (rank 1), so it
is exactly a rank-1 LoRA with ``lora_A = directionᵀ``, ``lora_B = step * row_mask`` and
``r = lora_alpha = 1``. The files are written directly from the computed edit (the model is not
wrapped or touched) and are ordinary PEFT folders: ``PeftModel.from_pretrained``,
``model.load_adapter``, lm-eval's ``peft=`` and vLLM load them. ``surgery.json`` beside them
records how the edit was made and a fingerprint of the base model's gate weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core import architectures
from ..core.edit import RowUpdate, SurgeryEdit, apply_row_updates
from ..core.provenance import fingerprint_mismatch, gate_fingerprint
from ..errors import SurgeryError
from .files import atomic_path, check_free_space, check_output_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SURGERY_METADATA = "surgery.json"
_PEFT_PREFIX = "base_model.model."
LoraPart = Literal["lora_A", "lora_B"]
_CONFIG_AND_HEADERS_BYTES = 1 << 20  # adapter_config.json and safetensors headers stay far below this


# ---------------------------------------------------------------------------- PEFT's tensor names


def peft_key(module_name: str, part: LoraPart) -> str:
    """PEFT's saved name of a LoRA tensor: ``base_model.model.<module>.lora_A.weight``."""
    return f"{_PEFT_PREFIX}{module_name}.{part}.weight"


def parse_peft_key(key: str) -> tuple[str, LoraPart]:
    """``(module_name, "lora_A" | "lora_B")`` of a saved LoRA tensor name; an error for anything else."""
    if key.startswith(_PEFT_PREFIX) and key.endswith(".weight"):
        module_name, _, part = key[len(_PEFT_PREFIX) : -len(".weight")].rpartition(".")
        if part in ("lora_A", "lora_B") and module_name:
            return module_name, part  # type: ignore[return-value]
    raise SurgeryError(
        f"'{key}' is not a LoRA tensor name of a PEFT adapter (base_model.model.<module>.lora_A|lora_B.weight)"
    )


def lora_tensors(edit: SurgeryEdit, model: nn.Module | architectures.GateRows) -> dict[str, torch.Tensor]:
    """The adapter's tensors in PEFT's saved naming (float32)."""
    # on a fused gate_up module the LoRA's up half stays zero
    out_features = architectures.gates_of(model).lora_out_features
    tensors = {}
    for layer in edit.layers:
        lora_b = torch.zeros(out_features, 1)
        lora_b[edit.regions.rows[layer], 0] = edit.step
        tensors[peft_key(edit.module_names[layer], "lora_A")] = edit.direction_of(layer).contiguous()[None, :].clone()
        tensors[peft_key(edit.module_names[layer], "lora_B")] = lora_b
    return tensors


def row_updates_of(tensors: dict[str, torch.Tensor]) -> list[RowUpdate]:
    """Decode rank-1 LoRA tensors back into gate-row updates (rows = nonzero entries of ``lora_B``)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module_name, part = parse_peft_key(key)
        pairs.setdefault(module_name, {})[part] = tensor
    updates = []
    for module_name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise SurgeryError(f"adapter has an incomplete LoRA pair for '{module_name}' ({sorted(pair)})")
        lora_a, lora_b = pair["lora_A"].float(), pair["lora_B"].float()
        if lora_a.shape[0] != 1 or lora_b.ndim != 2 or lora_b.shape[1] != 1:
            raise SurgeryError(
                f"adapter LoRA for '{module_name}' is not rank 1 "
                f"(lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)})"
            )
        rows = torch.nonzero(lora_b[:, 0]).flatten()
        updates.append(RowUpdate(module_name, rows, lora_b[rows, 0], lora_a[0]))
    return updates


def _peft_config(edit: SurgeryEdit, gates: architectures.GateRows, base_model_name: str):
    from peft import LoraConfig

    spec = gates.spec
    return LoraConfig(
        r=1,
        lora_alpha=1,
        lora_dropout=0.0,
        target_modules=[edit.module_names[layer] for layer in edit.layers],
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=spec.kind == "conv1d",
        base_model_name_or_path=base_model_name,
        inference_mode=True,
    )


def _peft_config_json(edit: SurgeryEdit, gates: architectures.GateRows, base_model_name: str) -> str:
    """PEFT's ``adapter_config.json`` text, with ``target_modules`` sorted: PEFT itself writes that set in
    hash order, so the same edit would not give the same file twice."""
    config = _peft_config(edit, gates, base_model_name).to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    return json.dumps(config, indent=2, sort_keys=True)


def export_adapter(
    edit: SurgeryEdit,
    model: nn.Module | architectures.GateRows,
    out_dir: str | os.PathLike,
    base_model_name: str,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the edit as a PEFT LoRA folder (temp folder, then rename).

    ``model`` is the loaded base model or its :class:`~surgery_plugin.architectures.GateRows`
    (e.g. read from checkpoint shards by :mod:`surgery_plugin.streaming`); the files are the same.
    """
    from safetensors.torch import save_file

    if not edit.layers:
        raise SurgeryError("the edit selects no gate rows; nothing to export")
    out_dir = check_output_folder(out_dir, overwrite)
    gates = architectures.gates_of(model)
    tensors = lora_tensors(edit, gates)
    record = {
        "format": "surgery_plugin/adapter/1",
        "base_model": base_model_name,
        "model_type": gates.model_type,
        "hidden_size": gates.hidden_size,
        "num_layers": gates.num_layers,
        "gate_rows_per_layer": gates.rows_per_layer,
        "gate_fingerprint": gate_fingerprint(gates),
        "alpha": edit.alpha,
        "step": edit.step,
        "rows": {str(layer): edit.regions.rows[layer].tolist() for layer in edit.layers},
        **edit.metadata,
        **(metadata or {}),
    }
    record_text = json.dumps(record, indent=1, default=str)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    check_free_space(out_dir, tensor_bytes + len(record_text.encode()) + _CONFIG_AND_HEADERS_BYTES)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / ADAPTER_CONFIG).write_text(_peft_config_json(edit, gates, base_model_name))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / SURGERY_METADATA).write_text(record_text)
    return out_dir


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """``(adapter_config, tensors, surgery_metadata)`` with clear errors for missing or corrupt files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise SurgeryError(f"adapter folder not found: {adapter_dir}")
    parts = {}
    for name in (ADAPTER_CONFIG, SURGERY_METADATA):
        path = adapter_dir / name
        if not path.is_file():
            raise SurgeryError(f"{adapter_dir} has no {name}; it is not a surgery adapter (made by `surgery edit`)")
        try:
            parts[name] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SurgeryError(f"{path} is corrupt: {err}") from err
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise SurgeryError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise SurgeryError(f"{weights} is corrupt: {err}") from err
    return parts[ADAPTER_CONFIG], tensors, parts[SURGERY_METADATA]


def check_compatible(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    force: bool = False,
    adapter: tuple[dict, dict[str, torch.Tensor], dict] | None = None,
) -> dict:
    """Stop with a one-line error when the adapter was made for another base model.

    ``adapter`` is what :func:`read_adapter` returned, when the caller has read it already.
    """
    config, tensors, record = adapter if adapter is not None else read_adapter(adapter_dir)
    made_for, given = record.get("base_model", "?"), architectures.model_name(model)
    base = architectures.unwrap(model)
    try:
        mtype = architectures.model_type(model)
        shape_ok = (
            mtype == record.get("model_type")
            and architectures.hidden_size(model) == record.get("hidden_size")
            and len(architectures.decoder_layers(model)) == record.get("num_layers")
            and architectures.num_gate_rows(model) == record.get("gate_rows_per_layer")
        )
    except SurgeryError:
        shape_ok = False
    if not shape_ok:
        raise SurgeryError(
            f"adapter {adapter_dir} was made for '{made_for}' ({record.get('model_type')}, "
            f"hidden {record.get('hidden_size')}, "
            f"{record.get('num_layers')} layers) and does not fit '{given}'"
        )
    for key in tensors:
        module_name, _ = parse_peft_key(key)
        try:
            base.get_submodule(module_name)
        except AttributeError as err:
            raise SurgeryError(
                f"adapter {adapter_dir} targets '{module_name}', which '{given}' does not have"
            ) from err
    mismatch = fingerprint_mismatch(record.get("gate_fingerprint", []), gate_fingerprint(model))
    if mismatch and not force:
        raise SurgeryError(
            f"adapter {adapter_dir} was made for '{made_for}' but '{given}' has other weights ({mismatch}); "
            "pass force=True / --force if you mean it"
        )
    return record


def load_edited(model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default", force: bool = False):
    """The model with the surgery adapter attached (a ``PeftModel``), after the compatibility guard."""
    from peft import PeftModel

    record = check_compatible(model, adapter_dir, force=force)
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    records = getattr(model, "surgery_records", {})
    records[adapter_name] = record
    model.surgery_records = records  # lets set_alpha map alpha to PEFT's scale
    return model


def set_alpha(peft_model, alpha: float, adapter_name: str = "default") -> None:
    """Change a loaded surgery adapter's alpha at run time (PEFT's LoRA scaling, no reload)."""
    from peft.tuners.lora import LoraLayer

    record = getattr(peft_model, "surgery_records", {}).get(adapter_name)
    if record is None:
        raise SurgeryError(
            f"adapter '{adapter_name}' was not loaded with surgery_plugin.load_edited; its alpha is unknown"
        )
    if record["alpha"] == 0:
        raise SurgeryError("this adapter was made with alpha 0; its direction cannot be rescaled")
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            module.set_scale(adapter_name, alpha / record["alpha"])


def merge_into(model: nn.Module, adapter_dir: str | os.PathLike, force: bool = False) -> dict[str, torch.Tensor]:
    """Add the adapter's edit to the model's weights in place: the compatibility check, then the
    same row update as the in-place edit (:func:`surgery.apply_row_updates`), so the result is
    bitwise the in-place edit in every dtype. Returns the original weights.
    """
    adapter = read_adapter(adapter_dir)
    check_compatible(model, adapter_dir, force=force, adapter=adapter)
    return apply_row_updates(model, row_updates_of(adapter[1]))


def compose(peft_model, adapter_names: list[str]) -> None:
    """Activate several loaded surgery adapters at once: their rank-1 deltas add up."""
    missing = [n for n in adapter_names if n not in peft_model.peft_config]
    if missing:
        raise SurgeryError(f"adapter(s) {missing} are not loaded; loaded: {sorted(peft_model.peft_config)}")
    peft_model.base_model.set_adapter(list(adapter_names), inference_mode=True)
