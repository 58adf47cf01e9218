"""The refusal direction (Arditi et al. 2024, andyrdt/refusal_direction), as a jailbreak probe for Model Surgery.

Harmful minus harmless instructions, each in the chat template with the generation prompt, at the last prompt
token: one candidate direction per layer (the difference of means). Each candidate is scored on validation
instructions by teacher forcing, without generation:

- ``induce``: the mean refusal log-odds of the first reply token on *harmful* validation instructions with the
  candidate added at its layer's input, minus the same without it (does adding it make refusal likelier?);
- ``kl_ablation``: the mean first-token KL on *harmless* validation instructions when the candidate is projected
  out of every layer (Arditi's filter: a direction whose removal changes harmless replies is not a refusal
  direction alone; KL <= ``max_kl``);
- candidates from the last ``skip_last`` of the layers are not eligible (they only steer the output tokens).

The chosen layer has the largest ``induce`` among the eligible ones. Refusal log-odds: ``log p(R) - log(1 - p(R))``
with ``R`` the first tokens of common refusal openings (:func:`refusal_token_ids`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SurgeryError
from .importance import kl_divergence, mean_and_se
from .steering import ablated_direction, added_direction

# openings of refusals (the GCG/AdvBench test prefixes that start a reply); their first tokens form R
REFUSAL_OPENINGS = (
    "I'm sorry",
    "I am sorry",
    "I cannot",
    "I can't",
    "Sorry",
    "As an AI",
    "I apologize",
    "My apologies",
)


def refusal_token_ids(tokenizer) -> list[int]:
    """The distinct first token ids of :data:`REFUSAL_OPENINGS`, without special tokens."""
    ids = set()
    for opening in REFUSAL_OPENINGS:
        encoded = tokenizer(opening, add_special_tokens=False)["input_ids"]
        if encoded:
            ids.add(int(encoded[0]))
    if not ids:
        raise SurgeryError("the tokenizer encodes no refusal opening; cannot score refusal")
    return sorted(ids)


def refusal_log_odds(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Per row of next-token log-probabilities: ``log p(R) - log(1 - p(R))``, ``R`` = ``token_ids``."""
    logprobs = logprobs.double()
    in_set = torch.logsumexp(logprobs[:, list(token_ids)], dim=-1)
    rest = torch.log1p(-in_set.exp().clamp(max=1 - 1e-12))
    return in_set - rest


def mean_differences(harmful: dict[int, torch.Tensor], harmless: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per hidden-state index: the harmful mean minus the harmless mean (each ``(texts, hidden)``)."""
    return {i: harmful[i].float().mean(0) - harmless[i].float().mean(0) for i in harmful}


def eligible_layers(n_layers: int, skip_last: float) -> list[int]:
    """Decoder layers whose input may carry the direction: the first ``ceil((1 - skip_last) * n)``, not layer 0's
    input (the embeddings)."""
    if not 0 <= skip_last < 1:
        raise SurgeryError(f"skip_last must be in [0, 1), got {skip_last}")
    return list(range(1, math.ceil((1 - skip_last) * n_layers)))


def score_candidates(
    model: nn.Module,
    next_logprobs,
    directions: dict[int, torch.Tensor],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    token_ids: Sequence[int],
    max_kl: float = 0.1,
    progress: bool = True,
) -> dict:
    """Each candidate layer's ``induce`` and ``kl_ablation`` (module docstring) and the chosen layer.

    ``directions`` maps a decoder layer to the direction at its input (hidden-state index = layer);
    ``next_logprobs(prompts)`` gives the model's next-token log-probabilities after each prompt (the caller's
    batching and chat formatting)."""
    base_harmful = refusal_log_odds(next_logprobs(harmful_val), token_ids)
    base_harmless = next_logprobs(harmless_val).double()
    rows = {}
    for layer, direction in tqdm(sorted(directions.items()), desc="refusal candidates", disable=not progress):
        with added_direction(model, layer, direction):
            induced = refusal_log_odds(next_logprobs(harmful_val), token_ids)
        with ablated_direction(model, direction):
            ablated = next_logprobs(harmless_val).double()
        kl = kl_divergence(base_harmless, ablated)
        shift, shift_se = mean_and_se(induced - base_harmful)
        rows[layer] = {
            "induce": shift,
            "induce_se": shift_se,
            "kl_ablation": float(kl.mean()),
            "direction_norm": float(direction.norm()),
            "eligible": float(kl.mean()) <= max_kl,
        }
    eligible = {layer: r for layer, r in rows.items() if r["eligible"]}
    chosen = max(eligible, key=lambda layer: eligible[layer]["induce"]) if eligible else None
    return {
        "base_refusal_log_odds": float(base_harmful.mean()),
        "candidates": {str(layer): r for layer, r in rows.items()},
        "chosen_layer": chosen,
        "max_kl": max_kl,
    }
