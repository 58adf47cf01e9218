"""The edit as a PEFT LoRA adapter: export, guarded load, alpha at run time, merge, compose.

Per layer the surgery changes the gate weight by ``step * row_mask ⊗ direction`` (rank 1), so it
is exactly a rank-1 LoRA with ``lora_A = directionᵀ``, ``lora_B = step * row_mask`` and
``r = lora_alpha = 1``. The files are written directly from the computed edit (the model is not
wrapped or touched) and are ordinary PEFT folders: ``PeftModel.from_pretrained``,
``model.load_adapter``, lm-eval's ``peft=`` and vLLM load them. ``surgery.json`` beside them, written
last, records how the edit was made, the base model's gate fingerprint, a digest of the edited rows (so
a double merge shows) and the sha256 of the two PEFT files; it is sealed (an edit of it shows).

:func:`read_adapter` is the one loader (eval, merge, stack, tune and EasyEdit go through it): it refuses
an ``adapter_config.json`` that disagrees with the edit's record (target modules, rank, ``lora_alpha``,
DoRA and every other PEFT option that changes the forward pass), NaN or infinite tensors, tensors that
are not the rank-1 edit the record describes (rows, step, alpha), and files that do not match their
digests (changed, or half-replaced while being read).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core import architectures
from ..core.edit import RowUpdate, SurgeryEdit, apply_row_updates
from ..core.provenance import fingerprint_mismatch, gate_fingerprint
from ..errors import SurgeryError
from .files import MANIFEST, check_free_space, is_temp_name, output, read_manifest, verify_files, write_manifest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SURGERY_METADATA = MANIFEST
FORMAT = "surgery_plugin/adapter/2"
_PEFT_PREFIX = "base_model.model."
LoraPart = Literal["lora_A", "lora_B"]
_HEADER_BYTES = 1 << 14  # a safetensors header and adapter_config.json stay far below this
# PEFT config keys that do not change what the adapter computes
_CONFIG_FREE = {
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "lora_dropout",
}
_MERGED_RTOL = 0.05  # of the step's shift of a layer's row digest: far above float error, far below one row's step


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


def _peft_config_dict(module_names: list[str], fan_in_fan_out: bool, base_model_name: str) -> dict:
    """The ``adapter_config.json`` of a surgery adapter (``target_modules`` sorted: PEFT writes that set in hash
    order, so the same edit would not give the same file twice)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=1,
        lora_alpha=1,
        lora_dropout=0.0,
        target_modules=sorted(module_names),
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model_name,
        inference_mode=True,
    ).to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def row_digests(gates: architectures.GateRows, updates: list[RowUpdate], layer_of: dict[str, int]) -> dict[str, float]:
    """Per edited layer, the sum over its edited rows of ``row · direction`` (float64): merging the edit adds
    ``step * |direction|²`` per row, so a second merge of any number of rows shows."""
    digests = {}
    with torch.no_grad():
        for update in updates:
            layer = layer_of[update.module_name]
            rows = gates.rows_at(layer, update.rows).double()
            digests[str(layer)] = float((rows @ update.direction.double()).sum())
    return digests


def _digest_shift(update: RowUpdate) -> float:
    return float(update.scales.double().sum() * update.direction.double().square().sum())


def write_adapter(
    edit: SurgeryEdit,
    gates: architectures.GateRows,
    folder: Path,
    base_model_name: str,
    metadata: dict[str, Any] | None = None,
) -> dict:
    """Write the adapter's three files into ``folder`` (which exists), the manifest last; returns the record."""
    from safetensors.torch import save_file

    tensors = lora_tensors(edit, gates)
    updates = edit.row_updates()
    layer_of = {edit.module_names[layer]: layer for layer in edit.layers}
    record = {
        "format": FORMAT,
        "kind": "adapter",
        "base_model": base_model_name,
        "model_type": gates.model_type,
        "hidden_size": gates.hidden_size,
        "num_layers": gates.num_layers,
        "gate_rows_per_layer": gates.rows_per_layer,
        "gate_fingerprint": gate_fingerprint(gates),
        "edited_row_digests": row_digests(gates, updates, layer_of),
        "alpha": edit.alpha,
        "step": edit.step,
        "step_per_alpha": edit.step / edit.alpha if edit.alpha else None,
        "rows": {str(layer): edit.regions.rows[layer].tolist() for layer in edit.layers},
        **edit.metadata,
        **(metadata or {}),
    }
    config = _peft_config_dict(list(layer_of), gates.spec.kind == "conv1d", base_model_name)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return write_manifest(folder, record, [ADAPTER_CONFIG, ADAPTER_WEIGHTS])


def export_adapter(
    edit: SurgeryEdit,
    model: nn.Module | architectures.GateRows,
    out_dir: str | os.PathLike,
    base_model_name: str,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the edit as a PEFT LoRA folder, whole or not at all (:func:`surgery_plugin.io.files.output`).

    ``model`` is the loaded base model or its :class:`~surgery_plugin.core.architectures.GateRows`
    (e.g. read from checkpoint shards by :mod:`surgery_plugin.core.streaming`); the files are the same.
    """
    if not edit.layers:
        raise SurgeryError("the edit selects no gate rows; nothing to export")
    gates = architectures.gates_of(model)
    tensor_bytes = 4 * (gates.hidden_size + gates.lora_out_features) * len(edit.layers)
    record_bytes = 32 * (edit.regions.num_rows + gates.num_layers * 64) + len(json.dumps(metadata or {}, default=str))
    check_free_space(out_dir, tensor_bytes + record_bytes + 3 * _HEADER_BYTES)
    with output(out_dir, "adapter", overwrite) as tmp:
        write_adapter(edit, gates, tmp, base_model_name, metadata)
    return Path(out_dir)


# ---------------------------------------------------------------------------- the one loader


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder as read and checked: its PEFT config, its tensors, its record, and the exact bytes."""

    folder: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    record: dict
    raw: dict[str, bytes]

    def updates(self) -> list[RowUpdate]:
        return row_updates_of(self.tensors)

    def peft_folder(self) -> tempfile.TemporaryDirectory:
        """The checked bytes in a private folder, for PEFT to load (a writer replacing the folder meanwhile
        cannot hand PEFT another version than the one checked)."""
        holder = tempfile.TemporaryDirectory(prefix="surgery-adapter-")
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            (Path(holder.name) / name).write_bytes(self.raw[name])
        return holder


def read_adapter(adapter_dir: str | os.PathLike, attempts: int = 3) -> AdapterFiles:
    """Read a surgery adapter folder and check it whole (see the module doc); a one-line error otherwise.

    A folder being replaced while it is read gives files of two versions: their digests disagree with
    the manifest, and the read is tried again (``attempts`` times) before it fails."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise SurgeryError(f"adapter folder not found: {adapter_dir}")
    if is_temp_name(adapter_dir):
        raise SurgeryError(f"{adapter_dir} is a writer's temporary folder, not an adapter")
    for attempt in range(attempts):
        try:
            return _read_adapter_once(adapter_dir)
        except _Mixed:
            if attempt == attempts - 1:
                raise SurgeryError(
                    f"{adapter_dir} changed while it was read ({attempts} times); is another process rewriting it?"
                ) from None
    raise AssertionError("unreachable")


class _Mixed(Exception):
    """Files of two versions: read again."""


def _read_adapter_once(adapter_dir: Path) -> AdapterFiles:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    record = read_manifest(adapter_dir, "adapter (made by `surgery edit`)")
    if not str(record.get("format", "")).startswith("surgery_plugin/adapter/"):
        raise SurgeryError(f"{adapter_dir / MANIFEST} is not a surgery adapter's record (kind {record.get('kind')!r})")
    raw = {}
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        try:
            raw[name] = (adapter_dir / name).read_bytes()
        except FileNotFoundError as err:
            raise SurgeryError(f"{adapter_dir} has no {name}; it is not a whole surgery adapter") from err
    if "files" in record:
        try:
            verify_files(adapter_dir, record, raw)
        except SurgeryError as err:
            if read_manifest(adapter_dir, "adapter") != record:  # the manifest itself changed: a writer swapped
                raise _Mixed from err
            raise
    try:
        config = json.loads(raw[ADAPTER_CONFIG].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise SurgeryError(f"{adapter_dir / ADAPTER_CONFIG} is corrupt ({err})") from err
    try:
        tensors = load_bytes(raw[ADAPTER_WEIGHTS])
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise SurgeryError(f"{adapter_dir / ADAPTER_WEIGHTS} is corrupt ({err})") from err
    files = AdapterFiles(adapter_dir, config, tensors, record, raw)
    _check_adapter(files)
    return files


def _check_adapter(files: AdapterFiles) -> None:
    """The config, the tensors and the record describe the same rank-1 edit."""
    where, config, record = files.folder, files.config, files.record
    if not isinstance(config, dict):
        raise SurgeryError(f"{where / ADAPTER_CONFIG} is not a JSON object")
    bad = [k for k, v in files.tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SurgeryError(f"{where / ADAPTER_WEIGHTS} has NaN or infinite values in '{bad[0]}'")
    updates = files.updates()  # rank 1, complete pairs, PEFT names
    modules = sorted(u.module_name for u in updates)
    recorded_rows = record.get("rows")
    if not isinstance(recorded_rows, dict) or len(recorded_rows) != len(modules):
        raise SurgeryError(
            f"{where / MANIFEST} lists rows of {len(recorded_rows or {})} layers; the tensors have {len(modules)}"
        )
    conv1d = architectures.spec_for_type(str(record.get("model_type"))).kind == "conv1d"
    expected = _peft_config_dict(modules, conv1d, str(record.get("base_model", "")))
    for key in sorted(set(expected) | set(config)):
        if key in _CONFIG_FREE or key not in config:
            continue  # an older PEFT wrote fewer keys: PEFT reads them at their defaults
        mine, theirs = expected.get(key), config[key]
        if isinstance(theirs, list) and isinstance(mine, list):
            theirs, mine = sorted(map(str, theirs)), sorted(map(str, mine))
        if key not in expected and theirs in (None, False, [], {}, ""):
            continue
        if theirs != mine:
            raise SurgeryError(
                f"{where / ADAPTER_CONFIG} says {key}={config[key]!r}, but this surgery edit needs "
                f"{key}={expected.get(key)!r}; the adapter would compute something else than the recorded edit"
            )
    step = record.get("step")
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        raise SurgeryError(f"{where / MANIFEST} has no numeric step")
    for update in updates:
        rows = recorded_rows.get(str(_module_layer(update.module_name)))
        if rows is None or sorted(rows) != update.rows.tolist():
            raise SurgeryError(f"{where}: the rows of '{update.module_name}' in the tensors differ from {MANIFEST}'s")
        if not torch.allclose(update.scales, torch.full_like(update.scales, float(step)), rtol=1e-6, atol=0):
            raise SurgeryError(f"{where}: lora_B of '{update.module_name}' is not the recorded step {step}")
    alpha, per_alpha = record.get("alpha"), record.get("step_per_alpha")
    if (
        record.get("normalize") is False
        and alpha is not None
        and abs(float(alpha) - float(step)) > 1e-6 * max(1, abs(step))
    ):
        raise SurgeryError(
            f"{where / MANIFEST}: alpha {alpha} and step {step} disagree (unnormalised: they are equal)"
        )
    if (
        per_alpha is not None
        and alpha is not None
        and abs(float(alpha) * per_alpha - step) > 1e-5 * max(1.0, abs(step))
    ):
        raise SurgeryError(f"{where / MANIFEST}: alpha {alpha} does not give the recorded step {step}")


def edit_of(adapter: AdapterFiles) -> SurgeryEdit:
    """The :class:`~surgery_plugin.core.edit.SurgeryEdit` an adapter holds (each layer's direction, rows, step)."""
    from ..core.regions import RegionSelection

    updates = adapter.updates()
    record = adapter.record
    layers = {_module_layer(u.module_name): u for u in updates}
    first = layers[min(layers)]
    regions = RegionSelection(
        {layer: u.rows for layer, u in sorted(layers.items())}, int(record.get("gate_rows_per_layer", 0))
    )
    return SurgeryEdit(
        direction=first.direction.float(),
        step=float(record["step"]),
        alpha=float(record["alpha"]),
        regions=regions,
        module_names={layer: u.module_name for layer, u in layers.items()},
        metadata={k: v for k, v in record.items() if k not in ("files", "record_sha256", "rows")},
        layer_directions={layer: u.direction.float() for layer, u in layers.items()},
    )


def _module_layer(module_name: str) -> int | None:
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    return None


def check_compatible(model: nn.Module, adapter: AdapterFiles, force: bool = False) -> dict:
    """Stop with a one-line error when the adapter was made for another base model, or is already merged in."""
    where, record = adapter.folder, adapter.record
    made_for, given = record.get("base_model", "?"), architectures.model_name(model)
    base = architectures.unwrap(model)
    try:
        gates = architectures.ModelGates(model)
        shape_ok = (
            gates.model_type == record.get("model_type")
            and gates.hidden_size == record.get("hidden_size")
            and gates.num_layers == record.get("num_layers")
            and gates.rows_per_layer == record.get("gate_rows_per_layer")
        )
    except SurgeryError:
        shape_ok = False
    if not shape_ok:
        raise SurgeryError(
            f"adapter {where} was made for '{made_for}' ({record.get('model_type')}, "
            f"hidden {record.get('hidden_size')}, {record.get('num_layers')} layers) and does not fit '{given}'"
        )
    updates = adapter.updates()
    for update in updates:
        try:
            base.get_submodule(update.module_name)
        except AttributeError as err:
            raise SurgeryError(
                f"adapter {where} targets '{update.module_name}', which '{given}' does not have"
            ) from err
    digests = record.get("edited_row_digests")
    if digests:
        layer_of = {u.module_name: _module_layer(u.module_name) for u in updates}
        now = row_digests(gates, updates, layer_of)
        for update in updates:
            key = str(layer_of[update.module_name])
            shift = _digest_shift(update)
            if shift and abs(now[key] - digests[key] - shift) <= _MERGED_RTOL * abs(shift):
                raise SurgeryError(
                    f"adapter {where} is already merged into '{given}' (its rows of layer {key} carry the edit); "
                    "load it onto the unedited model"
                )
    mismatch = fingerprint_mismatch(record.get("gate_fingerprint", []), gate_fingerprint(model))
    if mismatch and not force:
        raise SurgeryError(
            f"adapter {where} was made for '{made_for}' but '{given}' has other weights ({mismatch}); "
            "pass force=True / --force if you mean it"
        )
    return record


def load_edited(model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default", force: bool = False):
    """The model with the surgery adapter attached (a ``PeftModel``), after the checks of :func:`read_adapter`
    and :func:`check_compatible`; PEFT loads exactly the bytes that were checked."""
    from peft import PeftModel

    adapter = read_adapter(adapter_dir)
    record = check_compatible(model, adapter, force=force)
    with adapter.peft_folder() as folder:
        if isinstance(model, PeftModel):
            model.load_adapter(folder, adapter_name=adapter_name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, folder, adapter_name=adapter_name, is_trainable=False)
    records = getattr(model, "surgery_records", {})
    records[adapter_name] = record
    model.surgery_records = records  # lets set_alpha map alpha to PEFT's scale
    return model


def set_alpha(peft_model, alpha: float, adapter_name: str = "default") -> None:
    """Change a loaded surgery adapter's alpha at run time (PEFT's LoRA scaling, no reload)."""
    import math

    from peft.tuners.lora import LoraLayer

    record = getattr(peft_model, "surgery_records", {}).get(adapter_name)
    if record is None:
        raise SurgeryError(
            f"adapter '{adapter_name}' was not loaded with surgery_plugin.load_edited; its alpha is unknown"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or abs(alpha) > 1e4:
        raise SurgeryError(f"alpha must be a finite number with |alpha| <= 10000, got {alpha!r}")
    if record["alpha"] == 0:
        raise SurgeryError("this adapter was made with alpha 0; its direction cannot be rescaled")
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            module.set_scale(adapter_name, alpha / record["alpha"])


def merge_into(model: nn.Module, adapter_dir: str | os.PathLike, force: bool = False) -> dict[str, torch.Tensor]:
    """Add the adapter's edit to the model's weights in place: the same checks as loading, then the same row
    update as the in-place edit (:func:`surgery_plugin.core.edit.apply_row_updates`), so the result is
    bitwise the in-place edit in every dtype. Returns the original weights."""
    adapter = read_adapter(adapter_dir)
    check_compatible(model, adapter, force=force)
    return apply_row_updates(model, adapter.updates())


def compose(peft_model, adapter_names: list[str]) -> None:
    """Activate several loaded surgery adapters at once: their rank-1 deltas add up."""
    missing = [n for n in adapter_names if n not in peft_model.peft_config]
    if missing:
        raise SurgeryError(f"adapter(s) {missing} are not loaded; loaded: {sorted(peft_model.peft_config)}")
    peft_model.base_model.set_adapter(list(adapter_names), inference_mode=True)
