"""``surgery stack``: several behaviors at once, one adapter each, in a named stack folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..config import SurgeryHyperParams
from ..io.stack import export_stack
from ..pipeline import build_stack


def run_stack(
    model: nn.Module,
    tokenizer,
    steps: Sequence[tuple[str, SurgeryHyperParams]],
    out: str | os.PathLike,
    model_name: str,
    sequential: bool,
    overwrite: bool = False,
    data_dir=None,
) -> Path:
    """Build every behavior's edit (:func:`surgery_plugin.pipeline.build_stack`) and write the stack."""
    built = build_stack(model, tokenizer, steps, sequential=sequential, data_dir=data_dir)
    folder = export_stack(built, model, out, base_model_name=model_name, sequential=sequential, overwrite=overwrite)
    how = "sequential: each probe trained on the model edited before it" if sequential else "independent probes"
    print(f"stack -> {folder}  {', '.join(name for name, _ in steps)} ({how})")
    return folder
