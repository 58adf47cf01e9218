"""Every change :func:`surgery_plugin.easyedit.register` makes to EasyEdit at run time, and why.

Each patch is the smallest that works, and each is idempotent (registering twice changes nothing
the second time). EasyEdit's own files are never edited.

1. **Batch editing** (:func:`allow_batch_editing`). ``BatchEditor.is_batchable_method`` also
   answers True for "Surgery". EasyEdit hard-codes which algorithms may use
   ``batch_edit``/``normal_edit``; one surgery serves any number of requests (one probe from all
   of them), so it qualifies.
2. **Embedded model aliases** (:func:`wrap_editor_init`). ``BaseEditor.__init__`` and
   ``SafetyEditor.__init__`` are wrapped. EasyEdit's editors choose a model class by substring
   of ``model_name`` ("llama", "gpt", ...), and an alias such as ``smollm2-135m`` is neither a
   hub id nor a folder. When ``hparams.model_name`` is an alias, the wrapper loads it with
   :func:`surgery_plugin.models.load_model` (pad token = eos, padding side as EasyEdit sets it for
   llama models) and hands the original ``__init__`` the ``(model, tokenizer)`` pair both editors
   accept; afterwards ``editor.model_name`` is the alias again (BaseEditor's evaluation calls
   ``model_name.lower()``) and ``editor.hparams`` is the caller's object. Any other
   ``model_name`` goes straight to EasyEdit's own code.
3. **SafetyEditor's output length** (:func:`check_output_length`, inside the wrapper of 2).
   SafetyEditor generates ``max_output_length`` tokens and keeps only ``max_length -
   max_output_length`` prompt tokens (``evaluate_utils.test_safety_gen``). Surgery hparams
   without a ``max_output_length`` get one below ``max_length``; one at or above it is refused
   with a one-line error (SafetyEditor would cut every prompt to nothing).
4. **torchvision on a CPU-only torch** (:func:`declare_torchvision_ops_if_unloadable`, code in
   :mod:`.torchvision_guard`). Only when torchvision's compiled ops cannot load (PyPI's Linux
   torchvision is a CUDA build; with a CPU torch its ``import`` fails registering fake kernels for
   ``torchvision::nms``, and ``import easyeditor`` fails with it): the two op schemas are declared
   first so the pure-python parts import. Text editing never calls those ops. ``register()`` does
   it for its own process; since transformers imports torchvision whenever it is installed (so
   every model load would fail in that venv), ``make easyedit`` also installs it venv-wide as a
   ``.pth`` hook that runs just before the first ``import torchvision``, and only where the plain
   import fails.

5. **ROME's subject token in a prompt with braces** (:func:`count_subject_tokens_as_formatted`).
   ROME fills a template (``"... {} ..."``, literal braces escaped as ``{{``/``}}``, see
   :func:`~surgery_plugin.integrations.easyedit.baselines.rome_prompt`) with ``str.format``, which
   unescapes them, but ``rome.repr_tools.get_words_idxs_in_templates`` counts the tokens of the
   template's text split at ``"{}"``, still escaped. Where ``{{`` is more tokens than ``{`` (Gemma's
   tokenizer; SmolLM2's counts both as one) the subject's last token is placed one or more tokens too
   far: past the end of the prompt for SafeEdit records 4 and 6 (``IndexError: index 383 is out of
   bounds for dimension 0 with size 383``). The patched function counts the text ``str.format``
   produces; on templates without escaped braces it returns what EasyEdit's does. Every EasyEdit
   method that imports ``rome.repr_tools`` (ROME, MEMIT, AlphaEdit, ...) sees the patched one.

Not patched: restoring weights. Both editors restore a non-sequential edit by writing the
``weights_copy`` dict back; :func:`~surgery_plugin.easyedit.surgery_main.apply_surgery_to_model`
always returns that dict when ``return_orig_weights`` is set (EasyEdit always sets it).
"""

from __future__ import annotations

import copy as copy_module
import functools
import logging
import string
from typing import Any

from torch import nn

from ...core.dtypes import parse_dtype
from ...errors import SurgeryError
from ...models import EMBEDDED_MODELS, load_model
from . import torchvision_guard

logger = logging.getLogger(__name__)

ALG_NAME = "Surgery"
# SafetyEditor generates this many tokens per prompt and keeps only max_length - max_output_length
# prompt tokens, so it must stay below max_length (256 here, where EasyEdit's DINM yamls use a
# whole context of 1024-2048 and 300-600 output tokens)
DEFAULT_MAX_OUTPUT_LENGTH = 128
_SAFETY_FULL_CONTEXT = 1624  # from this max_length on, test_safety_gen does not truncate prompts
# BaseEditor right-pads llama-family tokenizers for these algorithms, left-pads for the rest
# (editors/editor.py, after the model is loaded); the alias loader does the same
RIGHT_PADDING_ALGS = frozenset({"ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE"})
_PATCH_MARK = "__surgery_plugin_patch__"


def declare_torchvision_ops_if_unloadable() -> None:
    """Patch 4: let ``import torchvision`` succeed when its compiled ops cannot load."""
    torchvision_guard.declare_ops_if_unloadable()


def allow_batch_editing(batch_editor: type) -> None:
    """Patch 1."""
    original = batch_editor.is_batchable_method
    if getattr(original, _PATCH_MARK, False):
        return

    def is_batchable_method(alg_name: str) -> bool:
        return alg_name == ALG_NAME or original(alg_name)

    setattr(is_batchable_method, _PATCH_MARK, True)
    batch_editor.is_batchable_method = staticmethod(is_batchable_method)  # not an Enum member: assignable


def wrap_editor_init(editor_class: type, safety: bool) -> None:
    """Patch 2 (and 3 for ``SafetyEditor``)."""
    original = editor_class.__init__
    if getattr(vars(editor_class).get("__init__"), _PATCH_MARK, False):  # its own, not an inherited wrapper
        return

    @functools.wraps(original)
    def __init__(self, hparams, *args, **kwargs):
        if safety and getattr(hparams, "alg_name", None) == ALG_NAME:
            check_output_length(hparams)
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


def template_literals(template: str) -> tuple[str, str]:
    """The text before and after the one ``{}`` of a ROME template, as ``template.format(word)`` writes it
    (``{{`` and ``}}`` unescaped)."""
    parts: list[list[str]] = [[]]
    for literal, field, *_ in string.Formatter().parse(template):
        parts[-1].append(literal)
        if field is not None:
            if field != "":
                raise ValueError(f"a ROME template holds one '{{}}' and no named field, got {{{field}}}")
            parts.append([])
    if len(parts) != 2:
        raise ValueError(f"a ROME template holds exactly one '{{}}', this one {len(parts) - 1}")
    return "".join(parts[0]), "".join(parts[1])


def subject_token_index(tok: Any, template: str, word: str, subtoken: str) -> int:
    """Where ROME reads ``word`` in ``template.format(word)``: the index of its last token (``last``), of the
    token after it (``first_after_last``; its last where nothing follows) or of its first, counted from the end
    (``first``), as EasyEdit's ``get_words_idxs_in_templates`` defines them, on the formatted text."""
    prefix, suffix = template_literals(template)
    n_prefix = len(tok.encode(prefix))
    n_prompt = len(tok.encode(prefix + word))
    n_input = len(tok.encode(prefix + word + suffix))
    if subtoken == "last" or subtoken == "first_after_last":
        return n_prompt - (1 if subtoken == "last" or n_input == n_prompt else 0)
    if subtoken == "first":
        return n_prefix - n_input
    raise ValueError(f"Unknown subtoken type: {subtoken}")


def count_subject_tokens_as_formatted(repr_tools: Any) -> None:
    """Patch 5: ``repr_tools.get_words_idxs_in_templates`` counts tokens of the formatted text."""
    if getattr(repr_tools.get_words_idxs_in_templates, _PATCH_MARK, False):
        return

    def get_words_idxs_in_templates(tok, context_templates, words, subtoken):
        return [
            [subject_token_index(tok, template, word, subtoken)]
            for template, word in zip(context_templates, words, strict=True)
        ]

    setattr(get_words_idxs_in_templates, _PATCH_MARK, True)
    repr_tools.get_words_idxs_in_templates = get_words_idxs_in_templates


def check_output_length(hparams: Any) -> None:
    """Patch 3: SafetyEditor reads ``max_output_length``; at or above ``max_length`` its prompt window is empty."""
    if getattr(hparams, "max_output_length", None) is None:
        hparams.max_output_length = min(DEFAULT_MAX_OUTPUT_LENGTH, max(1, hparams.max_length // 2))
    out, total = hparams.max_output_length, hparams.max_length
    if out < 1 or (total < _SAFETY_FULL_CONTEXT and out >= total):
        raise SurgeryError(
            f"max_output_length ({hparams.max_output_length}) must be in [1, max_length={hparams.max_length}): "
            "SafetyEditor keeps max_length - max_output_length prompt tokens"
        )


def load_for_editor(alias: str, hparams: Any, safety: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of an embedded alias, set up the way EasyEdit sets up a llama model."""
    dtype = parse_dtype("float16" if getattr(hparams, "fp16", False) else "float32")  # EasyEdit's fp16 flag
    model, tok = load_model(alias, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "right" if getattr(hparams, "alg_name", None) in RIGHT_PADDING_ALGS else "left"
    if safety:
        model.config.output_hidden_states = True  # SafetyEditor loads with it; DINM's layer search needs it
    return model, tok
