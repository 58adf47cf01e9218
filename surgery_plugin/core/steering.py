"""Interventions on the residual stream along one direction: for choosing a refusal direction, and as the
training-free baselines of ``surgery compare``.

- *Activation addition* (steering): a vector added at one decoder layer's input, every position
  (:func:`added_direction`, a context manager; :func:`add_direction_hook`, a hook that stays). Where the layer
  before adds its MLP output straight to the residual stream, the same vector is a bias on that MLP's down
  projection (:func:`steering_bias_module`; :func:`bias_reproduces_steering` checks it on the model itself),
  which a PEFT LoRA with ``lora_bias`` carries: a steering edit that loads at model-load time.
- *Directional ablation* (Arditi et al. 2024): the direction's component removed from every decoder layer's
  input and from the final hidden state (:func:`ablated_direction`, hooks), or -- the abliteration recipe --
  from what every attention output and MLP down projection writes into the residual stream, in the weights
  (:func:`ablation_deltas`, pure; :func:`apply_ablation`, which writes them and returns the originals).
  Without normalised block outputs (Llama, Mistral, Qwen, GPT-2...) the weight version keeps the direction
  out of everything the layers add; Gemma 2/3 normalise each block's output before the residual sum, so there
  it is an approximation (``GateSpec.post_block_norms``).

The hooks never touch the weights and are removed however their block exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import SurgeryError
from . import architectures


def _replace_hidden(args: tuple, kwargs: dict, change) -> tuple[tuple, dict]:
    """The layer call's arguments with its hidden states (first positional, or ``hidden_states=``) changed."""
    if args:
        return (change(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}


def add_direction_hook(model: nn.Module, layer: int, vector: torch.Tensor) -> RemovableHandle:
    """``vector`` added to the residual stream at the input of decoder layer ``layer``, every position, until the
    returned handle's ``remove()``."""
    block = architectures.decoder_layers(model)[layer]
    if vector.shape != (architectures.hidden_size(model),):
        raise SurgeryError(
            f"steering vector has shape {tuple(vector.shape)}; the model's hidden size is "
            f"{architectures.hidden_size(model)}"
        )

    def hook(_module, args, kwargs):
        return _replace_hidden(args, kwargs, lambda h: h + vector.to(h.device, h.dtype))

    return block.register_forward_pre_hook(hook, with_kwargs=True)


@contextlib.contextmanager
def added_direction(model: nn.Module, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """``vector`` added to the residual stream at the input of decoder layer ``layer`` inside the block."""
    handle = add_direction_hook(model, layer, vector)
    try:
        yield
    finally:
        handle.remove()


def steering_bias_module(model: nn.Module, layer: int) -> str:
    """The module (name relative to the CausalLM) whose output, plus a bias ``v``, adds ``v`` to decoder layer
    ``layer``'s input at every position: layer ``layer - 1``'s MLP down projection, the last writer into the
    residual stream before it. An error where there is none: layer 0 (its input is the embeddings) and Gemma 2/3
    (a norm sits between the down projection and the residual sum)."""
    spec = architectures.gate_spec(model)
    n_layers = len(architectures.decoder_layers(model))
    if not 1 <= layer < n_layers:
        raise SurgeryError(
            f"steering at layer {layer} has no down projection before it to carry a bias (layers 1..{n_layers - 1} do)"
        )
    if spec.post_block_norms:
        raise SurgeryError("this architecture normalises each block's output: a down-projection bias is not steering")
    return f"{spec.layers_path}.{layer - 1}.{spec.down_path}"


def bias_reproduces_steering(
    model: nn.Module, layer: int, vector: torch.Tensor, input_ids: torch.Tensor, rtol: float = 1e-4
) -> bool:
    """Whether adding ``vector`` to the output of :func:`steering_bias_module` gives layer ``layer`` the same input
    as :func:`added_direction` does, on ``input_ids`` (relative to the input's size): the architecture check,
    measured on the model itself (post-LN blocks or parallel branches that read the stream twice would fail it)."""
    writer = architectures.unwrap(model).get_submodule(steering_bias_module(model, layer))
    block = architectures.decoder_layers(model)[layer]
    seen: list[torch.Tensor] = []

    def capture(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().float())

    def add_bias(_module, _args, output):
        return output + vector.to(output.device, output.dtype)

    with torch.no_grad():
        with added_direction(model, layer, vector):
            handle = block.register_forward_pre_hook(capture, with_kwargs=True)
            try:
                model(input_ids=input_ids)
            finally:
                handle.remove()
        handles = [writer.register_forward_hook(add_bias), block.register_forward_pre_hook(capture, with_kwargs=True)]
        try:
            model(input_ids=input_ids)
        finally:
            for handle in handles:
                handle.remove()
    hooked, biased = seen
    return bool((hooked - biased).abs().max() <= rtol * hooked.abs().max().clamp_min(1.0))


def unit_vector(direction: torch.Tensor) -> torch.Tensor:
    """``direction`` scaled to length one (float32); a zero or non-finite direction is an error."""
    direction = direction.detach().float()
    norm = direction.norm()
    if not torch.isfinite(direction).all() or norm <= 0:
        raise SurgeryError("the direction is zero or not finite; nothing to steer or ablate along")
    return direction / norm


def ablation_deltas(
    writers: dict[str, torch.Tensor], direction: torch.Tensor, conv1d: bool = False
) -> dict[str, torch.Tensor]:
    """The change that removes ``direction``'s component from what each writer adds to the residual stream:
    ``-u (u^T W)`` for a weight ``W`` of shape ``(hidden, in)`` (``(in, hidden)`` when ``conv1d``: GPT-2's Conv1D;
    ``-u (u^T b)`` for a bias). Rank one per matrix. ``writers``: ``{name: weight or bias}``."""
    unit = unit_vector(direction)
    deltas = {}
    for name, tensor in writers.items():
        w = tensor.detach().float()
        u = unit.to(w.device)
        if w.dim() == 1:
            deltas[name] = -(u @ w) * u
        elif conv1d:
            deltas[name] = -torch.outer(w @ u, u)
        else:
            deltas[name] = -torch.outer(u, u @ w)
    return deltas


def apply_ablation(model: nn.Module, direction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Orthogonalise every residual-stream writer of ``model`` (weights and biases) against ``direction``, in
    place; returns ``{param_name: tensor before}`` (``core.edit.revert_edit`` restores them)."""
    spec = architectures.gate_spec(model)
    base = architectures.unwrap(model)
    params = dict(base.named_parameters())
    names = [
        f"{module}.{leaf}"
        for module in architectures.residual_writer_names(model)
        for leaf in ("weight", "bias")
        if f"{module}.{leaf}" in params
    ]
    deltas = ablation_deltas({n: params[n] for n in names}, direction, conv1d=spec.kind == "conv1d")
    originals = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            originals[name] = params[name].detach().clone()
            params[name].add_(delta.to(params[name].dtype))
    return originals


def project_out_of(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``hidden`` without its component along the unit vector ``unit`` (last dimension)."""
    unit = unit.to(hidden.device, hidden.dtype)
    return hidden - (hidden @ unit).unsqueeze(-1) * unit


@contextlib.contextmanager
def ablated_direction(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """``direction``'s component removed from the input of every decoder layer and from the last layer's output."""
    unit = unit_vector(direction)
    layers = architectures.decoder_layers(model)

    def pre_hook(_module, args, kwargs):
        return _replace_hidden(args, kwargs, lambda h: project_out_of(h, unit))

    def post_hook(_module, _args, output):
        if isinstance(output, tuple):
            return (project_out_of(output[0], unit), *output[1:])
        return project_out_of(output, unit)

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(post_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
