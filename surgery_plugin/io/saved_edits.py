"""A compared method's edit on disk, and loading it back onto the base model (``surgery compare``'s
``RUN_DIR/edits/<method>/``). Never a full checkpoint; every folder's manifest ``surgery.json`` says how
the edit was made and what it needs from the base model (folders written before it hold ``edit.json``,
and still load). One of:

- ``surgery``: a surgery adapter (:func:`surgery_plugin.io.adapter.export_adapter`, its manifest of kind
  ``adapter`` carrying the method's fields), rank-1 LoRA on gate rows;
- ``lora``: a low-rank change of a few weight matrices (ROME: rank one per edit) as an ordinary PEFT LoRA
  folder, ``W + B A`` with ``B A`` the truncated SVD of the change at its numerical rank;
- ``tensors``: the changed weight tensors as they are after the edit (``edited_tensors.safetensors``),
  for dense changes (DINM, FT): only those tensors, the rest of the model is the base;
- ``steering``: no weights, a vector added to the residual stream at one decoder layer's input
  (``steering.safetensors``; activation addition): loading it registers a forward hook. Where the vector is a
  bias on the layer before's down projection, :func:`save_steering_adapter` writes it as a ``lora`` instead: a
  PEFT LoRA with ``lora_bias`` (zero ``B A``, the vector as ``lora_B``'s bias) that loads at model-load time;
- ``prompt``: no weights, the instruction the model reads first (``edit.json`` only).

:func:`load_saved_edit` checks that the model is the base the edit was made for (sha256 of every
weight it changes; the gate fingerprint for ``steering``; an adapter's own guard for ``surgery``) before
applying it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import architectures
from ..core.edit import revert_edit
from ..core.provenance import fingerprint_mismatch, gate_fingerprint, package_versions, utc_now
from ..core.steering import add_direction_hook, bias_reproduces_steering, steering_bias_module
from ..errors import SurgeryError
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_edited, parse_peft_key, peft_key, read_adapter
from .files import MANIFEST as MANIFEST_NAME
from .files import output, output_kind, read_manifest, verify_files, write_manifest

EDIT_RECORD = "edit.json"  # before manifests: still read
EDITED_TENSORS = "edited_tensors.safetensors"
STEERING_VECTOR = "steering.safetensors"
FORMAT = "surgery_plugin/saved_edit/2"
KINDS = ("surgery", "lora", "tensors", "steering", "prompt")
LORA_BIAS_SUFFIX = ".lora_B.bias"  # PEFT's name of a lora_bias tensor


def tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(memoryview(data.view(torch.uint8).numpy())).hexdigest()


def changed_params(model: nn.Module, originals: dict[str, torch.Tensor]) -> int:
    """How many weights differ from ``originals`` (``{param_name: tensor before the edit}``)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        return int(
            sum((params[name].detach() != before.to(params[name].device)).sum() for name, before in originals.items())
        )


def lora_changed_params(tensors: dict[str, torch.Tensor]) -> int:
    """How many weights a LoRA (PEFT names) changes: the nonzero entries of every ``B @ A``, and of every
    ``lora_B`` bias (PEFT's ``lora_bias``: an added bias)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    biases = 0
    for key, tensor in tensors.items():
        if key.endswith(LORA_BIAS_SUFFIX):
            biases += int((tensor != 0).sum())
            continue
        module_name, part = parse_peft_key(key)
        pairs.setdefault(module_name, {})[part] = tensor.float()
    return biases + int(sum(int((p["lora_B"] @ p["lora_A"] != 0).sum()) for p in pairs.values()))


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _record(kind: str, base_model: str, metadata: dict | None, **fields: Any) -> dict:
    return {
        "format": FORMAT,
        "kind": "saved_edit",
        "edit_kind": kind,
        "base_model": base_model,
        **fields,
        **(metadata or {}),
        "created": utc_now(),
        "versions": package_versions(),
    }


def save_tensors_edit(
    model: nn.Module,
    originals: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    base_model: str,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """``kind: tensors``: the edited values of every parameter in ``originals`` (the ones the edit changed)."""
    from safetensors.torch import save_file

    if not originals:
        raise SurgeryError("the edit changed no weights; nothing to save")
    params = dict(model.named_parameters())
    with output(out_dir, "saved_edit", overwrite) as tmp:
        tensors = {name: params[name].detach().to("cpu").contiguous() for name in sorted(originals)}
        save_file(tensors, str(tmp / EDITED_TENSORS), metadata={"format": "pt"})
        base = {name: tensor_sha256(originals[name]) for name in sorted(originals)}
        write_manifest(tmp, _record("tensors", base_model, metadata, tensors=sorted(originals), base_sha256=base))
    return Path(out_dir)


def low_rank_factors(delta: torch.Tensor, max_rank: int, rtol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the SVD of ``delta`` cut at its numerical rank (at most ``max_rank``):
    singular values above ``rtol`` times the largest."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, min(max_rank, int((s > rtol * s[0]).sum()) if s[0] > 0 else 1))
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float().contiguous(), (root[:, None] * vh[:rank]).float().contiguous()


def save_low_rank_edit(
    model: nn.Module,
    originals: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    base_model: str,
    max_rank: int,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """``kind: lora``: the change of every matrix in ``originals`` as a PEFT LoRA of rank <= ``max_rank``.

    Every edited parameter must be the weight of a Linear module (``<module>.weight``). All modules
    share one rank ``r`` (the largest numerical rank found; a smaller one is padded with zeros), with
    ``lora_alpha = r`` so PEFT's scaling is 1.
    """
    if not originals:
        raise SurgeryError("the edit changed no weights; nothing to save")
    params = dict(model.named_parameters())
    factors = {}
    for name in sorted(originals):
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or not isinstance(model.get_submodule(module_name), nn.Linear):
            raise SurgeryError(f"'{name}' is not the weight of a Linear module; save the edit as tensors instead")
        delta = params[name].detach().float().cpu() - originals[name].float().cpu()
        factors[module_name] = low_rank_factors(delta, max_rank)
    rank = max(b.shape[1] for b, _ in factors.values())
    tensors = {}
    for module_name, (b, a) in factors.items():
        pad = rank - b.shape[1]
        tensors[peft_key(module_name, "lora_B")] = torch.nn.functional.pad(b, (0, pad)).contiguous()
        tensors[peft_key(module_name, "lora_A")] = torch.nn.functional.pad(a, (0, 0, 0, pad)).contiguous()
    base = {name: tensor_sha256(originals[name]) for name in sorted(originals)}
    return _write_lora(out_dir, base_model, tensors, rank, metadata, overwrite, base_sha256=base)


def _write_lora(
    out_dir: str | os.PathLike,
    base_model: str,
    tensors: dict[str, torch.Tensor],
    rank: int,
    metadata: dict | None,
    overwrite: bool,
    lora_bias: bool = False,
    **fields: Any,
) -> Path:
    """A ``kind: lora`` folder: PEFT's config (``lora_alpha = r``, so PEFT's scaling is 1) and tensors, and the
    manifest with ``fields``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules = sorted({parse_peft_key(k)[0] for k in tensors if not k.endswith(LORA_BIAS_SUFFIX)})
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=modules,
        bias="none",
        lora_bias=lora_bias,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    with output(out_dir, "saved_edit", overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_manifest(tmp, _record("lora", base_model, metadata, rank=rank, modules=modules, **fields))
    return Path(out_dir)


def save_prompt_edit(
    out_dir: str | os.PathLike, instruction: str, base_model: str, metadata: dict | None = None, overwrite=False
) -> Path:
    """``kind: prompt``: no weights, the instruction."""
    with output(out_dir, "saved_edit", overwrite) as tmp:
        write_manifest(tmp, _record("prompt", base_model, metadata, instruction=instruction))
    return Path(out_dir)


def save_steering_edit(
    model: nn.Module,
    layer: int,
    vector: torch.Tensor,
    out_dir: str | os.PathLike,
    base_model: str,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """``kind: steering``: ``vector`` added at the input of decoder layer ``layer``; the base model's gate
    fingerprint is recorded so that it loads onto that model only."""
    from safetensors.torch import save_file

    n_layers = len(architectures.decoder_layers(model))
    if not 0 <= layer < n_layers:
        raise SurgeryError(f"steering layer {layer} is out of range for a model with {n_layers} decoder layers")
    with output(out_dir, "saved_edit", overwrite) as tmp:
        save_file({"vector": vector.detach().float().cpu().contiguous()}, str(tmp / STEERING_VECTOR))
        write_manifest(
            tmp,
            _record(
                "steering",
                base_model,
                metadata,
                layer=layer,
                hidden_size=int(vector.numel()),
                vector_norm=float(vector.float().norm()),
                gate_fingerprint=gate_fingerprint(model),
            ),
        )
    return Path(out_dir)


def _steering_writer(model: nn.Module, layer: int) -> tuple[str, nn.Linear]:
    """The down projection that carries steering at ``layer`` as a bias (its name and module); an error where there
    is none or it is not a Linear module (PEFT's ``lora_bias`` needs one)."""
    module_name = steering_bias_module(model, layer)
    writer = architectures.unwrap(model).get_submodule(module_name)
    if not isinstance(writer, nn.Linear):
        raise SurgeryError(f"'{module_name}' is not a Linear module (PEFT's lora_bias needs one)")
    return module_name, writer


def save_steering_adapter(
    model: nn.Module,
    layer: int,
    vector: torch.Tensor,
    out_dir: str | os.PathLike,
    base_model: str,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """``kind: lora``: steering at decoder layer ``layer``'s input as a rank-1 PEFT LoRA on the down projection
    before it (:func:`~surgery_plugin.core.steering.steering_bias_module`) with ``lora_bias``: ``B A = 0``, the
    vector as ``lora_B``'s bias, ``lora_alpha = r`` so PEFT's scaling is 1. The caller checks that the bias
    reproduces the steering on this architecture (:func:`~surgery_plugin.core.steering.bias_reproduces_steering`).
    PEFT cannot merge it into a down projection without a bias (Llama's): it stays an adapter there."""
    module_name, writer = _steering_writer(model, layer)
    if vector.shape != (writer.out_features,):
        raise SurgeryError(
            f"steering vector has shape {tuple(vector.shape)}; '{module_name}' writes {writer.out_features} numbers"
        )
    tensors = {
        peft_key(module_name, "lora_A"): torch.zeros(1, writer.in_features),
        peft_key(module_name, "lora_B"): torch.zeros(writer.out_features, 1),
        peft_key(module_name, "lora_B").removesuffix(".weight") + ".bias": vector.detach().float().cpu().contiguous(),
    }
    return _write_lora(
        out_dir,
        base_model,
        tensors,
        1,
        metadata,
        overwrite,
        lora_bias=True,
        base_sha256={f"{module_name}.weight": tensor_sha256(writer.weight)},
        steering_layer=layer,
        vector_norm=float(vector.float().norm()),
    )


def save_steering(
    model: nn.Module,
    layer: int,
    vector: torch.Tensor,
    out_dir: str | os.PathLike,
    base_model: str,
    input_ids: torch.Tensor,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """A steering edit as a PEFT adapter (:func:`save_steering_adapter`) where a down-projection bias reproduces it
    on ``input_ids`` with this model, else as a hook (:func:`save_steering_edit`); the metadata says which form
    and, for the hook, why."""
    try:
        module_name, _ = _steering_writer(model, layer)
        if not bias_reproduces_steering(model, layer, vector, input_ids):
            raise SurgeryError(f"a bias on '{module_name}' does not reproduce the steering on this model")
    except SurgeryError as err:
        return save_steering_edit(
            model, layer, vector, out_dir, base_model, {**(metadata or {}), "hook_because": str(err)}, overwrite
        )
    return save_steering_adapter(model, layer, vector, out_dir, base_model, metadata, overwrite)


def read_edit_record(edit_dir: str | os.PathLike) -> dict:
    """How a saved edit was made, ``kind`` being the edit's kind (surgery, lora, tensors, prompt); its files
    checked against the manifest."""
    edit_dir = Path(edit_dir)
    found = output_kind(edit_dir)
    if found == "adapter":  # a surgery adapter: its own loader checks it
        return {**read_adapter(edit_dir).record, "kind": "surgery"}
    legacy = edit_dir / EDIT_RECORD
    if found == "saved_edit" and not legacy.is_file():
        record = read_manifest(edit_dir, "saved edit")
        verify_files(edit_dir, record)
        record = {**record, "kind": record.get("edit_kind")}
    elif legacy.is_file():
        try:
            record = json.loads(legacy.read_text())
        except (OSError, ValueError) as err:
            raise SurgeryError(f"{legacy} is corrupt: {err}") from err
    else:
        raise SurgeryError(f"{edit_dir} is not an edit saved by `surgery compare` (no {MANIFEST_NAME})")
    if not isinstance(record, dict) or record.get("kind") not in KINDS:
        raise SurgeryError(f"{edit_dir}: unknown edit kind {record.get('kind')!r}; known: {', '.join(KINDS)}")
    return record


def _check_base(model: nn.Module, record: dict, edit_dir, force: bool) -> None:
    params = dict(model.named_parameters())
    for name, digest in record.get("base_sha256", {}).items():
        if name not in params:
            raise SurgeryError(f"edit {edit_dir} changes '{name}', which this model does not have")
        if not force and tensor_sha256(params[name]) != digest:
            raise SurgeryError(
                f"edit {edit_dir} was made for other weights of '{name}' (base '{record.get('base_model')}'); "
                "pass force=True if you mean it"
            )


def load_saved_edit(model: nn.Module, edit_dir: str | os.PathLike, force: bool = False) -> tuple[nn.Module, dict]:
    """Apply a saved edit to the base ``model``; returns ``(model, edit.json)``.

    ``surgery`` and ``lora`` give a ``PeftModel`` (the adapter can be switched off); ``tensors`` writes
    the saved tensors into ``model`` in place; ``steering`` registers its hook on ``model`` (the record's
    ``"hook"`` is the handle: ``.remove()`` takes it off); ``prompt`` returns ``model`` unchanged (the
    instruction is in the record, for the caller to prepend).
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    record = read_edit_record(edit_dir)
    kind = record["kind"]
    if kind == "surgery":
        return load_edited(model, edit_dir, force=force), record
    _check_base(model, record, edit_dir, force)
    if kind == "lora":
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (Path(edit_dir) / name).is_file():
                raise SurgeryError(f"{edit_dir} has no {name}")
        return PeftModel.from_pretrained(model, str(edit_dir), is_trainable=False), record
    if kind == "tensors":
        tensors = load_file(str(Path(edit_dir) / EDITED_TENSORS))
        if sorted(tensors) != sorted(record.get("base_sha256", {})):
            raise SurgeryError(f"{edit_dir}: {EDITED_TENSORS} does not hold the tensors {EDIT_RECORD} lists")
        revert_edit(model, tensors)  # the one "write these values into the named parameters"
        return model, record
    if kind == "steering":
        mismatch = fingerprint_mismatch(record.get("gate_fingerprint", []), gate_fingerprint(model))
        if mismatch and not force:
            raise SurgeryError(
                f"steering edit {edit_dir} was made for another base model ('{record.get('base_model')}': "
                f"{mismatch}); pass force=True if you mean it"
            )
        vector = load_file(str(Path(edit_dir) / STEERING_VECTOR))["vector"]
        return model, {**record, "hook": add_direction_hook(model, int(record["layer"]), vector)}
    return model, record


def adapter_changed_params(adapter_dir: str | os.PathLike) -> int:
    """Weights a saved adapter (``surgery`` or ``lora``) changes."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if output_kind(adapter_dir) == "adapter":
        return lora_changed_params(read_adapter(adapter_dir).tensors)
    from safetensors.torch import load_file

    return lora_changed_params(load_file(str(weights)))
