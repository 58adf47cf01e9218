"""Model Surgery: change one behavior of a causal LM by editing a few MLP gate rows along a probe.

The flow, one module per step::

    data -> probe (probe.py) -> regions (regions.py) -> delta (surgery.py) -> in-place edit | PEFT adapter (adapter.py)
"""

from .adapter import compose, export_adapter, load_edited, merge_into, set_alpha
from .easyedit.surgery_main import apply_surgery_to_model
from .errors import SurgeryError
from .hparams import SurgeryHyperParams
from .models import load_model, resolve_model_path
from .probe import Probe, hidden_features, make_probe, probe_from_hparams, train_probe
from .regions import RegionSelection, select_regions
from .surgery import SurgeryEdit, apply_edit, execute_surgery, revert_edit

__version__ = "0.1.0"

__all__ = [
    "Probe",
    "RegionSelection",
    "SurgeryEdit",
    "SurgeryError",
    "SurgeryHyperParams",
    "apply_edit",
    "apply_surgery_to_model",
    "compose",
    "execute_surgery",
    "export_adapter",
    "hidden_features",
    "load_edited",
    "load_model",
    "make_probe",
    "merge_into",
    "probe_from_hparams",
    "resolve_model_path",
    "revert_edit",
    "select_regions",
    "set_alpha",
    "train_probe",
]
