"""Model Surgery: change one behavior of a causal LM by editing a few MLP gate rows along a probe.

The flow, one place per step::

    data/ -> core/probe.py -> core/regions.py -> core/edit.py -> in-place edit | io/adapter.py (PEFT) -> evaluation/
             (pipeline.build_edit runs the steps from hparams; commands/ are the CLI)

Importing the package is cheap: the names below are loaded on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used)
_EXPORTS = {
    "SurgeryError": "errors",
    "SurgeryHyperParams": "config",
    "load_model": "models",
    "resolve_model_path": "models",
    "Probe": "core.probe",
    "BehaviorData": "core.probe",
    "train_probe": "core.probe",
    "hidden_features": "core.features",
    "RegionSelection": "core.regions",
    "select_regions": "core.regions",
    "SurgeryEdit": "core.edit",
    "apply_edit": "core.edit",
    "execute_surgery": "core.edit",
    "revert_edit": "core.edit",
    "build_edit": "pipeline",
    "build_probe": "pipeline",
    "EditCache": "pipeline",
    "compose": "io.adapter",
    "export_adapter": "io.adapter",
    "load_edited": "io.adapter",
    "merge_into": "io.adapter",
    "set_alpha": "io.adapter",
    "apply_surgery_to_model": "integrations.easyedit.surgery_main",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery_plugin' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
