"""The edited model's flagged rate from the unedited model's samples: self-normalised importance sampling.

K continuations per prompt are sampled from the unedited model and judged once. For an edit, one
teacher-forced pass gives each continuation's ``log p_edit - log p_base``; per prompt the weights
``softmax`` of those log-ratios over its K samples re-weight the judged flags, so the estimate of the
edited model's rate needs no new generation and no new judging. The estimate is a smooth function of the
edit (no greedy flips); its error is the base sample's, shared by every edit measured on it, so edits are
compared on common random numbers. Standard errors are clustered by prompt (the mean of per-prompt values).

With nucleus sampling the log-ratio is of the untruncated distributions: exact for ``top_p = 1``, an
approximation otherwise (both arms truncate the same way; tokens leaving the edited nucleus are not
down-weighted to zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImportanceEstimate:
    per_prompt: torch.Tensor  # (P,) the edited model's estimated flagged share of each prompt
    base_per_prompt: torch.Tensor  # (P,) the judged share of the base samples of each prompt
    estimate: float  # mean of per_prompt
    se: float  # its standard error, clustered by prompt
    change: float  # mean of per_prompt - base_per_prompt
    change_se: float
    effective_samples: float  # mean over prompts of Kish's effective sample size (K when the edit is the identity)

    def as_dict(self) -> dict:
        return {
            "estimate": self.estimate,
            "se": self.se,
            "base": float(self.base_per_prompt.mean()),
            "change": self.change,
            "change_se": self.change_se,
            "effective_samples": self.effective_samples,
            "n_prompts": int(self.per_prompt.numel()),
        }


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean of per-prompt values and its standard error (sample standard deviation / sqrt(n))."""
    n = values.numel()
    if n == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    return mean, float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan


def self_normalised_rate(log_ratio: torch.Tensor, flagged: torch.Tensor) -> ImportanceEstimate:
    """``log_ratio``: (P, K) ``log p_edit(c) - log p_base(c)`` of each base sample; ``flagged``: (P, K) 1.0 /
    0.0 as judged, NaN where the judge gave no score (left out of its prompt). Prompts with no scored sample
    are left out."""
    if log_ratio.shape != flagged.shape or log_ratio.dim() != 2:
        raise ValueError(f"log_ratio {tuple(log_ratio.shape)} and flagged {tuple(flagged.shape)} must be (P, K)")
    scored = ~torch.isnan(flagged)
    keep = scored.any(dim=1)
    log_ratio, flagged, scored = log_ratio[keep].double(), flagged[keep].double(), scored[keep]
    logits = log_ratio.masked_fill(~scored, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    values = flagged.nan_to_num(0.0)
    per_prompt = (weights * values).sum(dim=1)
    base = (values * scored).sum(dim=1) / scored.sum(dim=1)
    estimate, se = mean_and_se(per_prompt)
    change, change_se = mean_and_se(per_prompt - base)
    ess = float((1.0 / (weights**2).sum(dim=1)).mean()) if weights.numel() else math.nan
    return ImportanceEstimate(per_prompt.float(), base.float(), estimate, se, change, change_se, ess)


def likelihood_shift(delta: torch.Tensor, toxic: torch.Tensor) -> dict:
    """Judge-free: ``delta`` (N,) per-token change of the log-likelihood of human continuations (edit - base),
    ``toxic`` (N,) which of them the record's own scores call toxic. The objective is the mean shift on toxic
    continuations minus that on the others (lower: the edit makes toxic text relatively less likely), with a
    two-sample standard error."""
    toxic = toxic.bool()
    if toxic.all() or not toxic.any():
        raise ValueError("the judge-free objective needs toxic and non-toxic continuations")
    on_toxic, on_other = mean_and_se(delta[toxic].double()), mean_and_se(delta[~toxic].double())
    return {
        "shift": on_toxic[0] - on_other[0],
        "se": math.sqrt(on_toxic[1] ** 2 + on_other[1] ** 2),
        "toxic": on_toxic[0],
        "non_toxic": on_other[0],
        "n_toxic": int(toxic.sum()),
        "n_non_toxic": int((~toxic).sum()),
    }


def kl_divergence(reference: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q)`` per row, from log-probabilities: P the unedited model, Q the edited one."""
    return (reference.exp() * (reference - edited)).sum(-1).clamp_min(0.0)
