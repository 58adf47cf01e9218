"""Inference-time interventions on the residual stream, for choosing a direction (and, later, as baselines):
add a vector at one decoder layer's input (activation addition), or remove a direction's component from
every decoder layer's input and from the final hidden state (directional ablation, Arditi et al. 2024).

Both are context managers around forward hooks: the weights are never touched, and the hooks are
removed however the block exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from . import architectures


def _replace_hidden(args: tuple, kwargs: dict, change) -> tuple[tuple, dict]:
    """The layer call's arguments with its hidden states (first positional, or ``hidden_states=``) changed."""
    if args:
        return (change(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}


@contextlib.contextmanager
def added_direction(model: nn.Module, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """``vector`` added to the residual stream at the input of decoder layer ``layer``, every position."""
    block = architectures.decoder_layers(model)[layer]

    def hook(_module, args, kwargs):
        return _replace_hidden(args, kwargs, lambda h: h + vector.to(h.device, h.dtype))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def project_out_of(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``hidden`` without its component along the unit vector ``unit`` (last dimension)."""
    unit = unit.to(hidden.device, hidden.dtype)
    return hidden - (hidden @ unit).unsqueeze(-1) * unit


@contextlib.contextmanager
def ablated_direction(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """``direction``'s component removed from the input of every decoder layer and from the last layer's output."""
    unit = direction.float() / direction.float().norm().clamp_min(1e-12)
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
