"""Where each model family keeps its decoder layers and its MLP gate.

The *gate* is the projection whose output goes through the MLP activation. Model Surgery edits
rows of it; a "row" is one output unit, i.e. one vector in the hidden space that the hidden state
is dotted with. The rest of the package only talks to models through :class:`GateSpec`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import SurgeryError

GateKind = Literal["linear", "conv1d"]


@dataclass(frozen=True)
class GateSpec:
    """How to reach the gate rows of one architecture."""

    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    gate_path: str  # dotted path from a decoder layer to the gate module
    kind: GateKind = "linear"  # "conv1d": GPT-2's Conv1D stores the weight as (in, out)
    fused_gate_rows: bool = False  # Phi-3's gate_up_proj: the first half of the outputs is the gate
    # what each gate row's activation is multiplied by and written through (region_scoring: activation)
    down_path: str = "mlp.down_proj"  # from a decoder layer to the projection back to the hidden size
    up_path: str | None = "mlp.up_proj"  # the gated MLP's up projection; None: the activation is the output
    # the attention's output projection: with down_path, what writes into the residual stream (directional ablation)
    attn_out_path: str = "self_attn.o_proj"
    # Gemma 2/3 normalise each block's output before adding it to the residual stream, so a writer's output is not
    # what the stream receives: directional ablation of the writers is then an approximation
    post_block_norms: bool = False
    final_norm_path: str = "norm"  # from the base transformer (architectures.base_transformer) to its final norm


_LLAMA_LIKE = GateSpec("model.layers", "mlp.gate_proj")
_GEMMA2_LIKE = GateSpec("model.layers", "mlp.gate_proj", post_block_norms=True)

ARCHITECTURES: dict[str, GateSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "phi3": GateSpec("model.layers", "mlp.gate_up_proj", fused_gate_rows=True, up_path="mlp.gate_up_proj"),
    "gpt2": GateSpec(
        "transformer.h",
        "mlp.c_fc",
        kind="conv1d",
        down_path="mlp.c_proj",
        up_path=None,
        attn_out_path="attn.c_proj",
        final_norm_path="ln_f",
    ),
    "gpt_neox": GateSpec(
        "gpt_neox.layers",
        "mlp.dense_h_to_4h",
        down_path="mlp.dense_4h_to_h",
        up_path=None,
        attn_out_path="attention.dense",
        final_norm_path="final_layer_norm",
    ),
    "gptj": GateSpec(
        "transformer.h",
        "mlp.fc_in",
        down_path="mlp.fc_out",
        up_path=None,
        attn_out_path="attn.out_proj",
        final_norm_path="ln_f",
    ),
    "opt": GateSpec(
        "model.decoder.layers",
        "fc1",
        down_path="fc2",
        up_path=None,
        attn_out_path="self_attn.out_proj",
        final_norm_path="decoder.final_layer_norm",
    ),
    "falcon": GateSpec(
        "transformer.h",
        "mlp.dense_h_to_4h",
        down_path="mlp.dense_4h_to_h",
        up_path=None,
        attn_out_path="self_attention.dense",
        final_norm_path="ln_f",
    ),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (PEFT's LoRA layers stay injected in it)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def model_name(model: nn.Module) -> str:
    """A stable name for metadata: the alias or path the model was loaded from."""
    config = getattr(unwrap(model), "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or type(model).__name__)


def model_type(model: nn.Module) -> str:
    config = getattr(unwrap(model), "config", None)
    if config is None or not getattr(config, "model_type", None):
        raise SurgeryError(f"{type(model).__name__} has no config.model_type; pass a transformers causal LM")
    return config.model_type


def spec_for_type(mtype: str) -> GateSpec:
    """The gate layout of a model type, or a one-line error naming the supported ones."""
    try:
        return ARCHITECTURES[mtype]
    except KeyError as err:
        raise SurgeryError(
            f"model type '{mtype}' is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from err


def gate_spec(model: nn.Module) -> GateSpec:
    return spec_for_type(model_type(model))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    spec = gate_spec(model)
    return unwrap(model).get_submodule(spec.layers_path)


# set on the config of a model loaded up to a probe layer only (models.load_model(..., probe_layer=...))
FULL_NUM_LAYERS_ATTR = "surgery_full_num_layers"


def full_num_layers(model: nn.Module) -> int:
    """Decoder layers of the whole model, also when only its first layers were loaded."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, FULL_NUM_LAYERS_ATTR, None) or len(decoder_layers(model))


def hidden_state_index(layer: int, n_layers: int) -> int:
    """A hidden-state index in HF's ``hidden_states`` numbering: 0 = embeddings, L = final (normed);
    negative counts from the end (-1 = final)."""
    index = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= index <= n_layers:
        raise SurgeryError(
            f"probe layer {layer} is out of range for a model with {n_layers} layers "
            f"(use 0..{n_layers} or -1..-{n_layers + 1})"
        )
    return index


def gate_module_names(model: nn.Module) -> list[str]:
    """Fully qualified names (relative to the CausalLM) of each layer's gate module, in layer order."""
    spec = gate_spec(model)
    n_layers = len(decoder_layers(model))
    return [f"{spec.layers_path}.{i}.{spec.gate_path}" for i in range(n_layers)]


def residual_writer_names(model: nn.Module) -> list[str]:
    """Names (relative to the CausalLM) of every layer's attention output and MLP down projection, in layer
    order: the modules whose outputs are added to the residual stream."""
    spec = gate_spec(model)
    n_layers = len(decoder_layers(model))
    return [f"{spec.layers_path}.{i}.{path}" for i in range(n_layers) for path in (spec.attn_out_path, spec.down_path)]


def gate_modules(model: nn.Module) -> list[nn.Module]:
    base = unwrap(model)
    return [_base_layer(base.get_submodule(name)) for name in gate_module_names(model)]


def _base_layer(module: nn.Module) -> nn.Module:
    # A PEFT-wrapped Linear keeps the original module in .base_layer
    return getattr(module, "base_layer", module)


def num_gate_rows(model: nn.Module) -> int:
    """Gate rows per layer (the MLP's intermediate size)."""
    return gate_rows(model, 0).shape[0]


def gate_rows(model: nn.Module, layer: int) -> torch.Tensor:
    """The gate rows of one layer as a (rows, hidden) view of the weight (no copy for Linear)."""
    spec = gate_spec(model)
    weight = gate_modules(model)[layer].weight
    return gate_rows_of_weight(weight, spec)


def _half(outputs: torch.Tensor, fused: bool, second: bool) -> torch.Tensor:
    """A fused gate_up module's gate half (first) or up half (second) of its outputs; all of them otherwise."""
    if not fused:
        return outputs
    half = outputs.shape[0] // 2
    return outputs[half:] if second else outputs[:half]


def gate_rows_of_weight(weight: torch.Tensor, spec: GateSpec) -> torch.Tensor:
    return _half(weight.T if spec.kind == "conv1d" else weight, spec.fused_gate_rows, second=False)


@dataclass(frozen=True)
class MlpReadout:
    """What turns one layer's gate rows into its MLP output, float32 on the CPU: the output is
    ``sum_r act(g_r . x + gate_bias_r) * (up_r . x + up_bias_r) * down_r`` (+ the down projection's bias)."""

    gate_bias: torch.Tensor  # (rows,), zeros for a bias-free gate
    up_rows: torch.Tensor | None  # (rows, hidden); None: an ungated MLP (the activation is the output)
    up_bias: torch.Tensor | None  # (rows,)
    down_columns: torch.Tensor  # (rows, hidden): the vector each row's activation writes into the residual stream


def _bias(module: nn.Module, rows: int, fused: bool, second: bool = False) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return torch.zeros(rows) if bias is None else _half(bias.detach().float().cpu(), fused, second)


def mlp_readout(model: nn.Module, layer: int) -> MlpReadout:
    """One layer's :class:`MlpReadout` (region_scoring: activation)."""
    spec = gate_spec(model)
    block = decoder_layers(model)[layer]
    gate = _base_layer(block.get_submodule(spec.gate_path))
    rows = gate_rows(model, layer).shape[0]
    down = _base_layer(block.get_submodule(spec.down_path)).weight.detach()
    columns = down if spec.kind == "conv1d" else down.T  # Conv1D stores (in, out): its rows are the columns
    up_rows = up_bias = None
    if spec.up_path is not None:
        up = _base_layer(block.get_submodule(spec.up_path))
        up_rows = _half(up.weight.detach(), spec.fused_gate_rows, second=True).float().cpu()
        up_bias = _bias(up, rows, spec.fused_gate_rows, second=True)
    return MlpReadout(_bias(gate, rows, spec.fused_gate_rows), up_rows, up_bias, columns.float().cpu())


def hidden_size(model: nn.Module) -> int:
    return gate_rows(model, 0).shape[1]


# the config key naming the activation that reads the gate's output, by how families spell it
_ACTIVATION_KEYS = ("hidden_activation", "hidden_act", "activation_function", "activation")


def gate_activation(model: nn.Module) -> nn.Module:
    """The activation applied to the gate's output (SiLU for Llama, tanh-GELU for Gemma 3, ...), from the config."""
    from transformers.activations import ACT2FN

    config = getattr(unwrap(model), "config", None)
    config = getattr(config, "text_config", None) or config
    for key in _ACTIVATION_KEYS:
        name = getattr(config, key, None)
        if isinstance(name, str):
            try:
                return ACT2FN[name]
            except KeyError as err:
                raise SurgeryError(f"unknown gate activation '{name}' ({key}) of {model_name(model)}") from err
    raise SurgeryError(f"{model_name(model)}'s config names no activation ({', '.join(_ACTIVATION_KEYS)})")


class GateRows(ABC):
    """A causal LM's gate rows, layer by layer, wherever they are: in a loaded model
    (:class:`ModelGates`) or in checkpoint shards on disk (:class:`surgery_plugin.streaming.CheckpointGates`).

    Selection, the normalised step, the adapter and the gate fingerprint read gates only through
    this, so the in-memory and the streaming edit are the same computation on the same blocks.
    """

    name: str  # the alias or path the model was loaded from
    model_type: str
    spec: GateSpec
    num_layers: int
    rows_per_layer: int  # gate rows per layer (the MLP's intermediate size)
    hidden_size: int

    def module_name(self, layer: int) -> str:
        """The gate module of ``layer``, relative to the CausalLM (PEFT's target name)."""
        return f"{self.spec.layers_path}.{layer}.{self.spec.gate_path}"

    @property
    def lora_out_features(self) -> int:
        """Output size of the gate module: a fused gate_up module is twice the gate rows."""
        return self.rows_per_layer * (2 if self.spec.fused_gate_rows else 1)

    @abstractmethod
    def row_blocks(self, layer: int, block_rows: int) -> Iterator[torch.Tensor]:
        """Consecutive blocks of at most ``block_rows`` gate rows of ``layer``, each (rows, hidden)."""

    @abstractmethod
    def entries(self, layer: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``gate_rows[rows, cols]`` of ``layer`` as a float32 CPU vector."""

    @abstractmethod
    def rows_at(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """The gate rows ``rows`` of ``layer``, (len(rows), hidden) float32 on the CPU."""


class ModelGates(GateRows):
    """The gate rows of a loaded model (PEFT-wrapped or not, on any device)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.name = model_name(model)
        self.model_type = model_type(model)
        self.spec = gate_spec(model)
        self.num_layers = len(decoder_layers(model))
        rows = gate_rows(model, 0)
        self.rows_per_layer, self.hidden_size = rows.shape

    def row_blocks(self, layer: int, block_rows: int) -> Iterator[torch.Tensor]:
        rows = gate_rows(self.model, layer)
        for start in range(0, rows.shape[0], block_rows):
            yield rows[start : start + block_rows]

    def entries(self, layer: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        gate = gate_rows(self.model, layer)
        return gate[rows.to(gate.device), cols.to(gate.device)].float().cpu()

    def rows_at(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        gate = gate_rows(self.model, layer)
        return gate[rows.to(gate.device)].float().cpu()


def gates_of(model: nn.Module | GateRows) -> GateRows:
    """``model`` itself when it already is a :class:`GateRows`, else the gates of the loaded model."""
    return model if isinstance(model, GateRows) else ModelGates(model)


def base_transformer(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``model.model`` for Llama, ``transformer`` for GPT-2)."""
    base = unwrap(model)
    prefix = getattr(base, "base_model_prefix", "")
    return getattr(base, prefix, base) if prefix else base


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the last hidden state goes through before the LM head."""
    return base_transformer(model).get_submodule(gate_spec(model).final_norm_path)
