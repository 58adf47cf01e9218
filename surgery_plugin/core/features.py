"""Hidden-state features of the frozen LM: hooks that capture hidden states and gate inputs from one
forward pass (stopping as soon as the last one was seen), and masked pooling over real tokens.

Used by the probe (pooled ``hidden_states[layer]``) and the reference statistics (pooled gate
inputs); texts are tokenized once, batched by length and right-padded by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from ..errors import SurgeryError
from . import architectures
from .batching import length_sorted_batches, pad

Pooling = Literal["mean", "last", "mean_drop_first", "mean_final_norm"]
# "mean_drop_first": the mean without each text's first token, whose hidden state in middle layers is often a
# massive outlier (an attention sink) that a plain mean is dominated by; a one-token text keeps its token.
# "mean_final_norm": the mean of every token's state after the model's final norm (what the LM head reads of it),
# so each token weighs by its direction, not its norm; the final hidden state is normed already, and gate inputs
# (normed by their own layer) are averaged as they are
POOLINGS: tuple[str, ...] = ("mean", "last", "mean_drop_first", "mean_final_norm")


class _StopForward(Exception):
    """Raised by a hook once everything needed was captured: the rest of the forward pass is skipped."""


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A hidden-state index in HF's ``hidden_states`` numbering: 0 = embeddings, L = final (normed)."""
    return architectures.hidden_state_index(layer, architectures.full_num_layers(model))


def _captures(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    hidden_indices: Sequence[int],
    gate_layers: Sequence[int] = (),
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """``hidden_states[i]`` for each hidden index and the input of each listed layer's gate module, from
    one forward pass that stops as soon as the last of them was seen (the LM head never runs).

    ``model`` may hold only its first layers (``models.load_model(..., probe_layer=...)``): then the
    output of its last layer is ``hidden_states[len(layers)]``, the input of the first missing layer.
    """
    transformer = architectures.base_transformer(model)
    layers = architectures.decoder_layers(model)
    gates = architectures.gate_modules(model)
    loaded, full = len(layers), architectures.full_num_layers(model)
    needed = max([i for i in hidden_indices] + [g + 1 for g in gate_layers], default=0)
    if needed > loaded:
        raise SurgeryError(f"hidden_states[{needed}] needs {needed} layers; this model was loaded with {loaded}")
    final = full in hidden_indices and full == loaded  # the normed final state: the whole stack runs
    hidden: dict[int, torch.Tensor] = {}
    gate_inputs: dict[int, torch.Tensor] = {}
    # execution order: layer i's input (2i) comes before its gate's input (2i + 1)
    positions = [2 * i for i in hidden_indices if not (final and i == full)] + [2 * layer + 1 for layer in gate_layers]
    last = None if final else max(positions)

    def hook(store: dict, key: int, position: int, output: bool = False):
        def grab_input(_module, args, kwargs):
            store[key] = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            if position == last:
                raise _StopForward

        def grab_output(_module, _args, result):
            store[key] = result[0] if isinstance(result, tuple) else result
            if position == last:
                raise _StopForward

        return grab_output if output else grab_input

    handles = []
    for i in hidden_indices:
        if i < loaded:
            handles.append(layers[i].register_forward_pre_hook(hook(hidden, i, 2 * i), with_kwargs=True))
        elif not final:  # i == loaded < full: the last loaded layer's output is the next layer's input
            handles.append(layers[loaded - 1].register_forward_hook(hook(hidden, i, 2 * i, output=True)))
    handles += [
        gates[layer].register_forward_pre_hook(hook(gate_inputs, layer, 2 * layer + 1), with_kwargs=True)
        for layer in gate_layers
    ]
    try:
        output = transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if final:
            hidden[full] = output.last_hidden_state
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in hidden_indices if i not in hidden] + [g for g in gate_layers if g not in gate_inputs]
    if missing:
        raise RuntimeError(f"layers {missing} were never called")
    return hidden, gate_inputs


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pool(
    states: torch.Tensor, mask: torch.Tensor, pooling: Pooling, final_norm: nn.Module | None = None
) -> torch.Tensor:
    """Each text's states pooled over its real tokens (``mask``), as ``pooling`` says (:data:`POOLINGS`);
    ``mean_final_norm`` runs ``final_norm`` over the states first (None: states that are normed already)."""
    if pooling == "mean_final_norm":
        if final_norm is not None:
            with torch.no_grad():
                states = final_norm(states)
        pooling = "mean"
    states, mask = states.float().cpu(), mask.cpu()
    if pooling == "last":
        return states[torch.arange(states.shape[0]), mask.sum(1) - 1]
    if pooling == "mean_drop_first":  # right-padded: position 0 is every text's first token
        mask = mask.clone()
        mask[mask.sum(1) > 1, 0] = 0
    return (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


@contextlib.contextmanager
def keep_text_end(tokenizer) -> Iterator[None]:
    """Truncate from the left while tokenizing probe texts: a long text is often prompt + answer, and the
    answer is what differs. SafeEdit's adversarial prompts run to 400+ tokens; cut from the right at
    ``max_length`` the safe and unsafe texts of one prompt would become the same prompt prefix."""
    side = getattr(tokenizer, "truncation_side", None)
    if side is None:
        yield
        return
    tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.truncation_side = side


@torch.no_grad()
def state_batches(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    hidden_indices: Sequence[int] = (),
    gate_layers: Sequence[int] = (),
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
    desc: str | None = None,
) -> Iterator[tuple[list[int], dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]]:
    """Per batch ``(indices into texts, hidden_states[i] by i, gate inputs by layer, mask)``, token-level,
    from ONE forward pass per batch: the loop :func:`pooled_states` and the gate diagnostics share.

    Texts are tokenized once (long texts keep their end), batched by length (little padding) and
    right-padded by hand (the tokenizer's padding settings are left alone); ``mask`` marks real tokens.
    ``hidden_indices`` are in HF numbering (:func:`resolve_layer` them first).
    """
    if len(texts) == 0:
        raise SurgeryError("no texts to compute probe features from")
    device = _model_device(model)
    with keep_text_end(tokenizer):
        encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    encoded = [ids if len(ids) else [tokenizer.eos_token_id] for ids in encoded]
    if desc is None:
        desc = f"features@{','.join(map(str, hidden_indices))}" + (" + gate inputs" if gate_layers else "")
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size, desc=desc, progress=progress):
            input_ids, mask = pad(
                [encoded[i] for i in batch], 0, "right"
            )  # right padding: causal positions never see it
            hidden, gates = _captures(model, input_ids.to(device), mask.to(device), hidden_indices, gate_layers)
            yield batch, hidden, gates, mask
    finally:
        model.train(was_training)


def pooled_states(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    hidden_indices: Sequence[int] = (),
    gate_layers: Sequence[int] = (),
    pooling: Pooling = "mean",
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Pooled ``hidden_states[i]`` and pooled gate inputs, each (len(texts), hidden) float32 in the order of
    ``texts``, for any number of layers from ONE forward pass per batch, pooled over real tokens only."""
    if pooling not in POOLINGS:
        raise SurgeryError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    hidden_indices = sorted({resolve_layer(model, i) for i in hidden_indices})
    gate_layers = sorted(set(gate_layers))
    width = architectures.hidden_size(model)
    hidden = {i: torch.empty(len(texts), width, dtype=torch.float32) for i in hidden_indices}
    gates = {layer: torch.empty(len(texts), width, dtype=torch.float32) for layer in gate_layers}
    batches = state_batches(model, tokenizer, texts, hidden_indices, gate_layers, batch_size, max_length, progress)
    norm = architectures.final_norm(model) if pooling == "mean_final_norm" else None
    full = architectures.full_num_layers(model)
    for batch, got_hidden, got_gates, mask in batches:
        for i, states in got_hidden.items():
            hidden[i][batch] = pool(states, mask, pooling, None if i == full else norm)
        for layer, states in got_gates.items():  # normed by their own layer already
            gates[layer][batch] = pool(states, mask, pooling)
    return hidden, gates


def hidden_features(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layer: int = -1,
    pooling: Pooling = "mean",
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled ``hidden_states[layer]`` (HF numbering), (len(texts), hidden) in float32, in the order of ``texts``."""
    index = resolve_layer(model, layer)
    hidden, _ = pooled_states(model, tokenizer, texts, [index], (), pooling, batch_size, max_length, progress)
    return hidden[index]


@torch.no_grad()
def mean_token_norm(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    index: int,
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> float:
    """The mean L2 norm of ``hidden_states[index]`` over the real tokens of ``texts``, the first token of each text
    left out (its state is an outlier in most models): the scale a steering strength is a fraction of."""
    total, count = 0.0, 0
    for _, hidden, _, mask in state_batches(model, tokenizer, texts, [index], (), batch_size, max_length, progress):
        keep = mask.clone().bool()
        keep[:, 0] = False
        norms = hidden[index].float().norm(dim=-1)
        total += float(norms[keep.to(norms.device)].sum())
        count += int(keep.sum())
    if count == 0:
        raise SurgeryError("no tokens past the first in the texts; cannot measure the residual norm")
    return total / count
