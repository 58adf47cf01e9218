"""Batched greedy generation (left padding) and perplexity, the two model calls of every harness."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    batch_size: int = 16,
    stop_at_newline: bool = False,
    max_prompt_tokens: int = 512,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations (new text only), in the order of ``prompts``.

    Prompts are sorted by length and left-padded by hand so every batch carries little padding
    and the tokenizer's own padding side is left alone.
    """
    encoded = [tokenizer(p, truncation=True, max_length=max_prompt_tokens)["input_ids"] or [tokenizer.eos_token_id] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad, device = _pad_id(tokenizer), _device(model)
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None,
            )
            for row, i in enumerate(batch):
                text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
                outputs[i] = text.split("\n")[0] if stop_at_newline else text
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 256,
               progress: bool = True) -> dict[str, float]:
    """Token-level perplexity over ``texts`` (each scored on its own, truncated to ``max_length``)."""
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), _pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            targets = input_ids[:, 1:].to(device)
            nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            target_mask = mask[:, 1:].to(device).float()
            total_nll += float((nll * target_mask).sum())
            total_tokens += int(target_mask.sum())
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(total_nll / max(total_tokens, 1)), "n_tokens": total_tokens, "n_texts": len(encoded)}
