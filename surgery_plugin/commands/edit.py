"""``surgery probe``, ``surgery edit`` and ``surgery merge``: a probe file, an adapter folder, a merged model.

Each job takes the loaded pieces it needs and returns what it wrote; :mod:`.cli` parses the command
line and loads the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..behaviors import Behavior
from ..config import SurgeryHyperParams
from ..core.edit import execute_surgery
from ..core.probe import Probe
from ..core.provenance import package_versions
from ..core.streaming import CheckpointGates
from ..errors import SurgeryError
from ..io.adapter import export_adapter, merge_into
from ..models import save_model
from ..pipeline import build_edit, build_probe


def needs_whole_model(probe_data: str) -> bool:
    """Probe data from the model's own continuations needs every layer (it generates); other data only the
    layers before the probe layer."""
    return "self" in (part.strip() for part in probe_data.split("+"))


def run_probe(
    model: nn.Module,
    tokenizer,
    hparams: SurgeryHyperParams,
    behavior: Behavior,
    out: str | os.PathLike,
    data_dir=None,
    overwrite: bool = False,
) -> Probe:
    """Train the probe ``hparams`` describe and save it to ``out`` (safetensors + how it was made)."""
    probe, _ = build_probe(model, tokenizer, hparams, data_dir=data_dir)
    probe.metadata["behavior"] = behavior.name
    probe.save(out, overwrite)
    m = probe.metadata
    print(
        f"probe -> {out}  {behavior.name} ({hparams.probe_data})  layer {m['layer']}  held-out accuracy "
        f"{m['test_accuracy']:.4f}  AUC {m['test_auc']:.4f}  (n_train {m['n_train']}, n_test {m['n_test']})"
    )
    return probe


def run_edit(
    base: nn.Module | CheckpointGates,
    tokenizer,
    probe_path: str | os.PathLike,
    hparams: SurgeryHyperParams,
    behavior: Behavior,
    out: str | os.PathLike,
    model_name: str,
    overwrite: bool = False,
    data_dir=None,
) -> Path:
    """The edit of ``base`` (a loaded model, or a checkpoint's gates read shard by shard) along a saved probe,
    written as a PEFT adapter folder."""
    streaming = isinstance(base, CheckpointGates)
    probe = Probe.load(probe_path, base)
    if streaming:  # only the gate tensors, read from the shards; the adapter is the same bits
        if hparams.needs_reference_stats():
            raise SurgeryError(
                f"{hparams.variants()} need the model's hidden states on benign text: they cannot stream; "
                "load the model (drop --streaming)"
            )
        edit = execute_surgery(base, probe, hparams, progress=True)
    else:
        edit = build_edit(base, tokenizer, hparams, probe=probe, data_dir=data_dir).edit
    folder = export_adapter(
        edit,
        base,
        out,
        base_model_name=model_name,
        overwrite=overwrite,
        metadata={
            "hparams": hparams.to_dict(),
            "behavior": behavior.name,
            "probe_file": str(probe_path),
            "probe_sha256": probe.sha256(),
            "versions": package_versions(),
            "streaming": streaming,
        },
    )
    print(
        f"adapter -> {folder}  {edit.regions.num_rows} gate rows in {len(edit.layers)} layers, "
        f"alpha {hparams.alpha} (step {edit.step:.4g})"
    )
    return folder


def run_merge(
    model: nn.Module,
    tokenizer,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    model_name: str,
    force: bool,
    overwrite: bool = False,
) -> Path:
    """The model with the adapter's edit added to its weights, saved as an ordinary HF folder."""
    merge_into(model, adapter, force=force)
    source = {"base_model": model_name, "adapter": str(adapter)}
    folder = save_model(model, tokenizer, out, source=source, overwrite=overwrite)
    print(f"merged model -> {folder}")
    return folder
