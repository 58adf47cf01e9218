"""EasyEdit integration: ``register()`` makes "Surgery" an EasyEdit algorithm.

EasyEdit (zjunlp/EasyEdit, installed from its git checkout) is imported lazily, only inside
:func:`register` and the helpers it calls; importing this module never imports it.

What :func:`register` changes in EasyEdit, and why. Each change is the smallest that works, and
each is idempotent (calling ``register()`` twice changes nothing the second time):

1. ``easyeditor.util.alg_dict.ALG_DICT["Surgery"] = apply_surgery_easyedit``, mutating the dict
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
``weights_copy`` dict back; ``apply_surgery_easyedit`` always returns that dict when
``return_orig_weights`` is set (EasyEdit always sets it), whatever ``keep_original_weight`` is.

Probes: with ``probe_path`` the saved probe is used. Otherwise the probe is built from the
requests' texts (``prompt + target_new`` acceptable, ``prompt + ground_truth`` undesired) plus
``hparams.probe_data``. The features of ``probe_data`` are the slow part (minutes for 2x2000
texts on a CPU) and do not depend on the request, so they are cached in this process, keyed on
the texts, the feature settings, the tokenizer and a fingerprint of the model's weights: a
restored model hits the cache, an edited one (sequential editing) misses it.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import functools
import hashlib
import importlib
import importlib.util
import logging
import sys
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .errors import SurgeryError
from .hparams import SurgeryHyperParams
from .models import EMBEDDED_MODELS, load_model, model_name, parse_dtype
from .probe import Probe, check_labels, difference_of_means, hidden_features, resolve_layer, train_probe

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
_FEATURE_CACHE_SIZE = 4

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
    ee.ALG_DICT[ALG_NAME] = apply_surgery_easyedit  # in place: the editors hold this very dict
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
    """SafetyEditor reads ``max_output_length``; with it >= ``max_length`` every prompt is cut to nothing."""
    if not hasattr(hparams, "max_output_length"):
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


# ---------------------------------------------------------------------------- the algorithm


def apply_surgery_easyedit(
    model: nn.Module,
    tok,
    requests: Sequence[dict] | None,
    hparams: SurgeryHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """What EasyEdit calls for "Surgery": :func:`surgery.apply_surgery_to_model` with a cached probe.

    ``weights_copy`` is filled whenever ``return_orig_weights`` is set, so EasyEdit's default
    restore (``copy_to_param`` for every entry) undoes the edit between non-sequential edits.
    ``keep_original_weight`` and EasyEdit's extra arguments (``train_ds``) are accepted and unused.
    """
    from .surgery import apply_edit, execute_surgery

    if copy:
        model = copy_module.deepcopy(model)
    probe = easyedit_probe(model, tok, requests or [], hparams)
    edit = execute_surgery(model, probe, hparams)
    weights_copy = apply_edit(model, edit, return_orig_weights=return_orig_weights)
    logger.info("surgery edited %d gate rows in %d layers (alpha %s)", edit.regions.num_rows, len(edit.layers), hparams.alpha)
    return model, weights_copy


# ---------------------------------------------------------------------------- probe + cache


def model_fingerprint(model: nn.Module) -> str | None:
    """A digest of every parameter's name, shape, dtype, device and values; None when values are not visible.

    CPU tensors are hashed byte for byte. Elsewhere (GPU) the values enter as float64 sum and
    sum of squares computed on the device, which any surgery changes, instead of copying
    every weight to the host.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        if param.device.type == "meta":  # offloaded: the weights are not here to fingerprint
            return None
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{param.device}".encode())
        data = param.detach()
        if data.device.type == "cpu":
            digest.update(memoryview(data.contiguous().view(torch.uint8).numpy()))
        else:
            moments = torch.stack([data.sum(dtype=torch.float64), data.double().square().sum()])
            digest.update(moments.cpu().numpy().tobytes())
    return digest.hexdigest()


def _texts_digest(texts: Sequence[str], labels: Sequence[int]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for text, label in zip(texts, labels):
        digest.update(f"{label}\x00{text}\x01".encode())
    return digest.hexdigest()


def _tokenizer_id(tok) -> tuple:
    size = len(tok) if hasattr(tok, "__len__") else getattr(tok, "vocab_size", None)
    return type(tok).__name__, str(getattr(tok, "name_or_path", "")), size


_feature_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_cache_stats = {"hits": 0, "misses": 0}


def clear_probe_cache() -> None:
    """Forget every cached ``probe_data`` feature matrix."""
    _feature_cache.clear()
    _cache_stats.update(hits=0, misses=0)


def probe_cache_info() -> dict[str, int]:
    return {"entries": len(_feature_cache), **_cache_stats}


def _probe_data_features(model: nn.Module, tok, data, hparams: SurgeryHyperParams) -> torch.Tensor:
    """Features of ``hparams.probe_data``: computed once per (model weights, texts, settings)."""
    fingerprint = model_fingerprint(model)
    key = (fingerprint, _texts_digest(data.texts, data.labels), _tokenizer_id(tok), hparams.probe_layer,
           hparams.pooling, hparams.max_length, hparams.feature_batch_size)
    if fingerprint is not None and key in _feature_cache:
        _cache_stats["hits"] += 1
        _feature_cache.move_to_end(key)
        logger.info("probe data features: cache hit (%d texts)", len(data.texts))
        return _feature_cache[key]
    _cache_stats["misses"] += 1
    logger.info("probe data features: computing %d texts (cached for later edits of the same weights)", len(data.texts))
    features = hidden_features(model, tok, data.texts, hparams.probe_layer, hparams.pooling,
                               hparams.feature_batch_size, hparams.max_length, progress=False)
    if fingerprint is not None:
        _feature_cache[key] = features
        while len(_feature_cache) > _FEATURE_CACHE_SIZE:
            _feature_cache.popitem(last=False)
    return features


@contextlib.contextmanager
def _keep_text_end(tok) -> Iterator[None]:
    """Truncate from the left: a request text is prompt + answer and the answer is what differs.

    SafeEdit's adversarial prompts run to 400+ tokens; cut from the right at ``max_length`` the
    safe and unsafe texts of a request become the same prompt prefix.
    """
    side = getattr(tok, "truncation_side", None)
    if side is None:
        yield
        return
    tok.truncation_side = "left"
    try:
        yield
    finally:
        tok.truncation_side = side


def easyedit_probe(model: nn.Module, tok, requests: Sequence[dict], hparams: SurgeryHyperParams, data_dir=None) -> Probe:
    """The probe of one EasyEdit call: ``probe_path``, else requests' texts + ``probe_data`` (features cached)."""
    from .data import BehaviorData, load_behavior_data
    from .pipeline import requests_to_data

    if hparams.probe_path:
        return Probe.load(hparams.probe_path, model)
    parts: list[tuple[BehaviorData, torch.Tensor]] = []
    request_data = requests_to_data(requests) if requests else None
    if request_data is not None and request_data.texts:
        with _keep_text_end(tok):
            features = hidden_features(model, tok, request_data.texts, hparams.probe_layer, hparams.pooling,
                                       hparams.feature_batch_size, hparams.max_length, progress=False)
        parts.append((request_data, features))
    if hparams.probe_data:
        data = load_behavior_data(hparams.probe_data, data_dir, hparams.probe_max_per_class, hparams.seed)
        parts.append((data, _probe_data_features(model, tok, data, hparams)))
    if not parts:
        raise SurgeryError("no probe: set probe_path or probe_data in the hparams, or pass requests with target_new/ground_truth")
    data = BehaviorData([t for d, _ in parts for t in d.texts], [l for d, _ in parts for l in d.labels],
                        " + ".join(d.description for d, _ in parts))
    return probe_from_features(model, data, torch.cat([f for _, f in parts]), hparams)


def probe_from_features(model: nn.Module, data, features: torch.Tensor, hparams: SurgeryHyperParams) -> Probe:
    """:func:`pipeline.make_probe` from precomputed features (same rules, same metadata)."""
    from .pipeline import MIN_PER_CLASS_FOR_CLASSIFIER, package_versions, training_from_hparams

    labels = list(data.labels)
    counts = (labels.count(0), labels.count(1))
    if min(counts) == 0:
        raise SurgeryError(f"probe data has a single class ({counts[0]} acceptable, {counts[1]} undesired); it needs both")
    training = training_from_hparams(hparams)
    if min(counts) < MIN_PER_CLASS_FOR_CLASSIFIER:
        probe = difference_of_means(features, labels)
        nan = float("nan")
        metrics = {"method": "difference_of_means", "n_train": len(labels), "n_test": 0, "test_accuracy": nan, "test_auc": nan}
    else:
        check_labels(labels)
        probe, metrics = train_probe(features, labels, training, progress=False)
        metrics["method"] = "linear_softmax"
    probe.metadata = {
        "model": model_name(model),
        "layer": resolve_layer(model, hparams.probe_layer),
        "layer_requested": hparams.probe_layer,
        "pooling": hparams.pooling,
        "hidden_size": probe.hidden_size,
        "data": data.description,
        "seed": training.seed,
        "training": {"epochs": training.epochs, "lr": training.lr, "batch_size": training.batch_size,
                     "test_fraction": training.test_fraction, "weight_decay": training.weight_decay},
        "max_length": hparams.max_length,
        "versions": package_versions(),
        "source": "easyedit",
        **metrics,
    }
    return probe
