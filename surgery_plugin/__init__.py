"""Model Surgery: change one behavior of a causal LM by editing a few MLP gate rows along a probe.

The flow, one module per step::

    data -> probe (probe.py) -> regions (regions.py) -> delta (surgery.py) -> in-place edit | PEFT adapter (adapter.py)
"""

from .adapter import compose, export_adapter, load_edited, merge_into, set_alpha
from .errors import SurgeryError
from .hparams import SurgeryHyperParams
from .models import load_model, resolve_model_path
from .pipeline import make_probe
from .probe import Probe, hidden_features, train_probe
from .regions import RegionSelection, select_regions
from .surgery import SurgeryEdit, apply_edit, apply_surgery_to_model, execute_surgery, revert_edit

__version__ = "0.1.0"

__all__ = [
    "Probe",
    "RegionSelection",
    "SurgeryEdit",
    "SurgeryError",
    "SurgeryHyperParams",
    "apply_edit",
    "compose",
    "apply_surgery_to_model",
    "execute_surgery",
    "export_adapter",
    "hidden_features",
    "load_edited",
    "load_model",
    "make_probe",
    "merge_into",
    "resolve_model_path",
    "revert_edit",
    "select_regions",
    "set_alpha",
    "train_probe",
]
