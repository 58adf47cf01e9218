"""Everything EasyEdit, laid out like one of EasyEdit's method folders.

| module | what |
|---|---|
| ``__init__`` | :func:`register`: makes "Surgery" an EasyEdit algorithm (imports EasyEdit lazily) |
| ``surgery_main.py`` | ``apply_surgery_to_model`` (EasyEdit's contract) and the request -> probe path |
| ``patches.py`` | the runtime patches ``register()`` applies, each with the EasyEdit behavior it answers |
| ``torchvision_guard.py`` | patch 4: ``import torchvision`` next to a CPU-only torch (also venv-wide) |
| ``baselines.py`` | EasyEdit's DINM, ROME, FT-L, FT-M as ``surgery compare`` baselines, run through its editor |

The hyperparameters are :class:`surgery_plugin.hparams.SurgeryHyperParams` (``hparams/Surgery/*.yaml``).
Importing this package never imports EasyEdit: only :func:`register` and :func:`easyeditor_modules` do.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import SimpleNamespace

from ...errors import SurgeryError, first_line
from . import patches
from .patches import ALG_NAME
from .surgery_main import apply_surgery_to_model

logger = logging.getLogger(__name__)

SETUP_HINT = "`make easyedit` installs it into the venv (scripts/install_easyedit.sh)"
__all__ = ["ALG_NAME", "apply_surgery_to_model", "easyeditor_modules", "register"]


def _import(name: str):
    # by full module name: `import easyeditor.util.alg_dict` fails because the attribute
    # easyeditor.util is shadowed by a star-export of easyeditor.models.melo.util
    return importlib.import_module(name)


def easyeditor_modules() -> SimpleNamespace:
    """EasyEdit's registry and editors, importing it on first use; a one-line SurgeryError otherwise."""
    patches.declare_torchvision_ops_if_unloadable()
    try:
        root = _import("easyeditor")
    except ModuleNotFoundError as err:
        if err.name == "easyeditor":
            raise SurgeryError(f"EasyEdit is not installed (no module 'easyeditor'); {SETUP_HINT}") from err
        raise SurgeryError(f"EasyEdit is installed but does not import ({first_line(err)}); {SETUP_HINT}") from err
    except Exception as err:  # any import-time failure of a third-party package: one line for the user
        raise SurgeryError(f"EasyEdit is installed but does not import ({first_line(err)}); {SETUP_HINT}") from err
    where = str(Path(getattr(root, "__file__", "") or "?").parent)
    needed = {
        "alg_dict": ("easyeditor.util.alg_dict", "ALG_DICT"),
        "batch_editor": ("easyeditor.editors.batch_editor", "BatchEditor"),
        "editor": ("easyeditor.editors.editor", "BaseEditor"),
        "safety_editor": ("easyeditor.editors.safety_editor", "SafetyEditor"),
        "device": ("easyeditor.util.device", "normalize_device"),  # device: cpu support
        "rome_repr_tools": ("easyeditor.models.rome.repr_tools", "get_words_idxs_in_templates"),
    }
    found = {}
    for key, (module, attribute) in needed.items():
        try:
            found[key] = _import(module)
        except ImportError:
            found[key] = None
        if found[key] is None or not hasattr(found[key], attribute):
            raise SurgeryError(
                f"EasyEdit at {where} is too old for Surgery (no {module}.{attribute}); "
                f"install the current git version, {SETUP_HINT}"
            )
    if not isinstance(found["alg_dict"].ALG_DICT, dict) or not hasattr(
        found["batch_editor"].BatchEditor, "is_batchable_method"
    ):
        raise SurgeryError(
            f"EasyEdit at {where} is too old for Surgery (unexpected ALG_DICT/BatchEditor); "
            f"install the current git version, {SETUP_HINT}"
        )
    return SimpleNamespace(
        location=where,
        ALG_DICT=found["alg_dict"].ALG_DICT,
        BatchEditor=found["batch_editor"].BatchEditor,
        BaseEditor=found["editor"].BaseEditor,
        SafetyEditor=found["safety_editor"].SafetyEditor,
        rome_repr_tools=found["rome_repr_tools"],
    )


def register() -> None:
    """Make "Surgery" an EasyEdit algorithm. Idempotent; call it before building an editor.

    ``ALG_DICT["Surgery"] = apply_surgery_to_model`` mutates EasyEdit's dict in place: the editor
    modules star-import it, so they all hold the same object, and they look the algorithm up when
    they are constructed. The other changes are listed in :mod:`.patches`.
    """
    ee = easyeditor_modules()
    ee.ALG_DICT[ALG_NAME] = apply_surgery_to_model  # in place: the editors hold this very dict
    patches.allow_batch_editing(ee.BatchEditor)
    patches.wrap_editor_init(ee.BaseEditor, safety=False)
    patches.wrap_editor_init(ee.SafetyEditor, safety=True)
    patches.count_subject_tokens_as_formatted(ee.rome_repr_tools)
    logger.info("registered %s with EasyEdit at %s", ALG_NAME, ee.location)
