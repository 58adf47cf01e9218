"""EasyEdit integration: ``register()`` makes "Surgery" an EasyEdit algorithm.

EasyEdit (zjunlp/EasyEdit, installed from its git checkout) is imported lazily, only inside
:func:`register` and the helpers it calls; importing this module never imports it.

What :func:`register` changes in EasyEdit, and why. Each change is the smallest that works, and
each is idempotent (calling ``register()`` twice changes nothing the second time):

1. ``easyeditor.util.alg_dict.ALG_DICT["Surgery"] = surgery.apply_surgery_to_model``, mutating the dict
   in place. The editor modules star-import that dict, so they all hold the same object;
   rebinding the name would not reach them. Editors look the algorithm up when they are
   constructed, so ``register()`` must run before ``BaseEditor``/``SafetyEditor(...)``.
2. ``BatchEditor.is_batchable_method`` also answers True for "Surgery". EasyEdit hard-codes
   the algorithms that may use ``batch_edit``/``normal_edit``; a surgery handles any number of
   requests in one edit (one probe from all of them), so it qualifies.
3. ``BaseEditor.__init__`` and ``SafetyEditor.__init__`` are wrapped. When ``hparams.model_name``
   is one of surgery_plugin's embedded aliases (``smollm2-135m``), the model is loaded with
   :func:`surgery_plugin.models.load_model` and handed to the original ``__init__`` as the
   ``(model, tokenizer)`` pair both editors accept. Needed because the editors choose a model
   class by substring of ``model_name`` ("llama", "gpt", ...), and an alias is neither a hub id
   nor a folder. Afterwards ``editor.model_name`` is the alias again (BaseEditor's evaluation
   calls ``model_name.lower()``) and ``editor.hparams`` is the caller's object. Any other
   ``model_name`` goes straight to EasyEdit's own code. For SafetyEditor, Surgery hparams without
   a ``max_output_length`` (which its evaluation reads) get one below ``max_length``, and one
   at or above ``max_length`` is refused (SafetyEditor would cut every prompt to nothing).
4. Only when torchvision's compiled ops cannot load (PyPI's Linux torchvision is a CUDA build;
   with a CPU-only torch its ``import`` fails registering fake kernels for ``torchvision::nms``,
   and ``import easyeditor`` fails with it): the two op schemas are declared first so the
   pure-python parts import. Text editing never calls those ops.

Not patched: restoring weights. Both editors restore a non-sequential edit by writing the
``weights_copy`` dict back; :func:`surgery.apply_surgery_to_model` always returns that dict when
``return_orig_weights`` is set (EasyEdit always sets it), whatever ``keep_original_weight`` is.

Probes: with ``probe_path`` the saved probe is used. Otherwise the probe is built from the
requests' texts (``prompt + target_new`` acceptable, ``prompt + ground_truth`` undesired) plus
``hparams.probe_data``, in :func:`pipeline.probe_for_request`, which caches the ``probe_data``
features per model weights (a restored model hits the cache, an edited one misses it).
"""

from __future__ import annotations

import copy as copy_module
import functools
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError
from .models import EMBEDDED_MODELS, load_model, parse_dtype
from .surgery import apply_surgery_to_model

logger = logging.getLogger(__name__)

ALG_NAME = "Surgery"
# SafetyEditor generates this many tokens per prompt and keeps only max_length - max_output_length
# prompt tokens (evaluate_utils.test_safety_gen), so it must stay below max_length (256 here,
# where EasyEdit's DINM yamls use a whole context of 1024-2048 and 300-600 output tokens)
DEFAULT_MAX_OUTPUT_LENGTH = 128
_SAFETY_FULL_CONTEXT = 1624  # from this max_length on, test_safety_gen does not truncate prompts
# BaseEditor right-pads llama-family tokenizers for these algorithms, left-pads for the rest
# (editors/editor.py, after the model is loaded); the alias loader does the same
_RIGHT_PADDING_ALGS = frozenset({"ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE"})
_PATCH_MARK = "__surgery_plugin_patch__"
_SETUP_HINT = "see scripts/setup_easyedit.sh"

# keeps the torchvision op declarations alive (a torch.library.Library drops them when collected)
_torchvision_stub_library: Any = None


# ---------------------------------------------------------------------------- import EasyEdit


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _declare_torchvision_ops_if_unloadable() -> None:
    """Let ``import torchvision`` succeed when its compiled ops cannot load (see module doc, 4)."""
    global _torchvision_stub_library
    if _torchvision_stub_library is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    compiled = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    if not compiled:
        return
    try:
        torch.ops.load_library(str(compiled[0]))  # what torchvision itself does first; fine when it loads
        return
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            library.define(schema)
        except RuntimeError:  # already declared
            pass
    _torchvision_stub_library = library
    logger.info("torchvision's compiled ops do not load with this torch (%s); declared nms/qnms so it imports", torch.__version__)


def _import(name: str):
    # by full module name: `import easyeditor.util.alg_dict` fails because the attribute
    # easyeditor.util is shadowed by a star-export of easyeditor.models.melo.util
    return importlib.import_module(name)


def easyeditor_modules() -> SimpleNamespace:
    """EasyEdit's registry and editors, importing it on first use; a one-line SurgeryError otherwise."""
    _declare_torchvision_ops_if_unloadable()
    try:
        root = _import("easyeditor")
    except ModuleNotFoundError as err:
        if err.name == "easyeditor":
            raise SurgeryError(f"EasyEdit is not installed (no module 'easyeditor'); install its git checkout, {_SETUP_HINT}") from None
        raise SurgeryError(f"EasyEdit is installed but does not import ({_first_line(err)}); {_SETUP_HINT}") from None
    except Exception as err:  # any import-time failure of a third-party package: one line for the user
        raise SurgeryError(f"EasyEdit is installed but does not import ({_first_line(err)}); {_SETUP_HINT}") from None
    where = str(Path(getattr(root, "__file__", "") or "?").parent)
    needed = {
        "alg_dict": ("easyeditor.util.alg_dict", "ALG_DICT"),
        "batch_editor": ("easyeditor.editors.batch_editor", "BatchEditor"),
        "editor": ("easyeditor.editors.editor", "BaseEditor"),
        "safety_editor": ("easyeditor.editors.safety_editor", "SafetyEditor"),
        "device": ("easyeditor.util.device", "normalize_device"),  # device: cpu support
    }
    found = {}
    for key, (module, attribute) in needed.items():
        try:
            found[key] = _import(module)
        except ImportError:
            found[key] = None
        if found[key] is None or not hasattr(found[key], attribute):
            raise SurgeryError(f"EasyEdit at {where} is too old for Surgery (no {module}.{attribute}); install the current git version, {_SETUP_HINT}")
    if not isinstance(found["alg_dict"].ALG_DICT, dict) or not hasattr(found["batch_editor"].BatchEditor, "is_batchable_method"):
        raise SurgeryError(f"EasyEdit at {where} is too old for Surgery (unexpected ALG_DICT/BatchEditor); install the current git version, {_SETUP_HINT}")
    return SimpleNamespace(
        location=where,
        ALG_DICT=found["alg_dict"].ALG_DICT,
        BatchEditor=found["batch_editor"].BatchEditor,
        BaseEditor=found["editor"].BaseEditor,
        SafetyEditor=found["safety_editor"].SafetyEditor,
    )


def easyedit_location() -> str:
    """The folder of the ``easyeditor`` package that :func:`register` uses."""
    return easyeditor_modules().location


# ---------------------------------------------------------------------------- registration


def register() -> None:
    """Make "Surgery" an EasyEdit algorithm (see the module doc for every change). Idempotent."""
    ee = easyeditor_modules()
    ee.ALG_DICT[ALG_NAME] = apply_surgery_to_model  # in place: the editors hold this very dict
    _allow_batch_editing(ee.BatchEditor)
    _wrap_editor_init(ee.BaseEditor, safety=False)
    _wrap_editor_init(ee.SafetyEditor, safety=True)
    logger.info("registered %s with EasyEdit at %s", ALG_NAME, ee.location)


def _allow_batch_editing(batch_editor: type) -> None:
    original = batch_editor.is_batchable_method
    if getattr(original, _PATCH_MARK, False):
        return

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name == ALG_NAME or original(alg_name)

    setattr(is_batchable_method, _PATCH_MARK, True)
    batch_editor.is_batchable_method = staticmethod(is_batchable_method)  # not an Enum member: assignable


def _wrap_editor_init(editor_class: type, safety: bool) -> None:
    original = editor_class.__init__
    if getattr(vars(editor_class).get("__init__"), _PATCH_MARK, False):  # its own, not an inherited wrapper
        return

    @functools.wraps(original)
    def __init__(self, hparams, *args, **kwargs):
        if safety and getattr(hparams, "alg_name", None) == ALG_NAME:
            _check_output_length(hparams)
        alias = getattr(hparams, "model_name", None)
        if not (isinstance(alias, str) and alias in EMBEDDED_MODELS):
            return original(self, hparams, *args, **kwargs)
        shadow = copy_module.copy(hparams)
        shadow.model_name = load_for_editor(alias, hparams, safety)
        original(self, shadow, *args, **kwargs)
        self.hparams = hparams  # the caller's object: edits and evaluation read it
        self.model_name = alias  # BaseEditor's evaluation calls model_name.lower()

    setattr(__init__, _PATCH_MARK, True)
    editor_class.__init__ = __init__


def _check_output_length(hparams: Any) -> None:
    """SafetyEditor reads ``max_output_length``; at or above ``max_length`` its prompt window is empty or garbled."""
    if getattr(hparams, "max_output_length", None) is None:
        hparams.max_output_length = min(DEFAULT_MAX_OUTPUT_LENGTH, max(1, hparams.max_length // 2))
    out, total = hparams.max_output_length, hparams.max_length
    if out < 1 or (total < _SAFETY_FULL_CONTEXT and out >= total):
        raise SurgeryError(f"max_output_length ({hparams.max_output_length}) must be in [1, max_length={hparams.max_length}): "
                           "SafetyEditor keeps max_length - max_output_length prompt tokens")


def load_for_editor(alias: str, hparams: Any, safety: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of an embedded alias, set up the way EasyEdit sets up a llama model."""
    dtype = parse_dtype("float16" if getattr(hparams, "fp16", False) else "float32")  # EasyEdit's fp16 flag
    model, tok = load_model(alias, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "right" if getattr(hparams, "alg_name", None) in _RIGHT_PADDING_ALGS else "left"
    if safety:
        model.config.output_hidden_states = True  # SafetyEditor loads with it; DINM's layer search needs it
    return model, tok
