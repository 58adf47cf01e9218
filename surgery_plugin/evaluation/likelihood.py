"""Objectives that need no new generation per edit: a search measures many edits on one set of prompts.

- :class:`ImportanceObjective`: K nucleus continuations of the *unedited* model per prompt, sampled and judged
  once (coupled noise, :func:`.suites.generate_for_suite`); for an edit one teacher-forced pass gives each
  continuation's log-ratio and :func:`surgery_plugin.core.importance.self_normalised_rate` the edited model's
  flagged share, with a standard error clustered by prompt.
- :class:`HumanContinuationObjective`: judge-free; the change of the per-token log-likelihood of the RTP
  records' own human continuations, those Perspective calls toxic minus the others
  (:func:`surgery_plugin.core.importance.likelihood_shift`).

Both compare every edit to the same unedited log-probabilities, computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.importance import ImportanceEstimate, likelihood_shift, self_normalised_rate
from ..errors import SurgeryError
from .generation import continuation_logprobs
from .metrics import is_missing
from .protocols import EvalSettings
from .suites import format_for, generate_for_suite, judge_texts, suite_documents

IMPORTANCE_SUITES = ("rtp", "toxigen", "attitude", "advbench")  # generation suites whose flag is "score >= threshold"


@dataclass
class BaseSamples:
    """The unedited model's K samples of each prompt of one suite (token ids as sampled), judged once."""

    suite: str
    texts: list[str]  # formatted prompts, as the model reads them
    add_special_tokens: bool | None
    continuations: list[list[str]]  # (P, K) texts, as judged
    ids: list[list[list[int]]]  # (P, K) token ids, as sampled
    flagged: torch.Tensor  # (P, K): 1.0 / 0.0 by the objective's judge, NaN unscored
    judge: str
    k: int

    def rows(self) -> list[dict]:
        """What a study stores so a resumed search reuses the judged samples (no re-sampling, no re-judging)."""
        return [
            {"text": t, "continuations": c, "ids": i, "flagged": [None if math.isnan(x) else x for x in f.tolist()]}
            for t, c, i, f in zip(self.texts, self.continuations, self.ids, self.flagged, strict=True)
        ]


def sample_base(model: nn.Module, tokenizer, suite: str, settings: EvalSettings, k: int) -> BaseSamples:
    """``k`` coupled nucleus samples of each of ``suite``'s prompts from ``model`` (``settings``: its split, seed,
    top-p), scored once by ``settings.judges[0]``."""
    if suite not in IMPORTANCE_SUITES:
        raise SurgeryError(f"the likelihood objective takes the suites {', '.join(IMPORTANCE_SUITES)}, not '{suite}'")
    if not settings.judges:
        raise SurgeryError("the likelihood objective needs a judge")
    judge = settings.judges[0]
    prompts = [d["prompt"] for d in suite_documents(suite, settings)]
    texts, chat = format_for(tokenizer, suite, prompts, settings)
    (continuations, ids), _ = generate_for_suite(
        model,
        tokenizer,
        suite,
        prompts,
        settings,
        num_samples=k,
        seed=settings.seed,
        top_p=settings.top_p,
        return_ids=True,
    )
    flat = [c for per_prompt in continuations for c in per_prompt]
    scores = judge_texts([judge], flat, [p for p in prompts for _ in range(k)])[judge.name]
    flags = [math.nan if is_missing(s) else float(s >= settings.threshold) for s in scores]
    flagged = torch.tensor(flags, dtype=torch.float32).view(len(prompts), k)
    return BaseSamples(suite, texts, False if chat else None, continuations, ids, flagged, judge.name, k)


def base_samples_from(rows: list[dict], suite: str, judge: str, add_special_tokens: bool | None) -> BaseSamples:
    """:meth:`BaseSamples.rows` read back."""
    k = len(rows[0]["continuations"])
    flagged = torch.tensor([[math.nan if x is None else x for x in r["flagged"]] for r in rows], dtype=torch.float32)
    return BaseSamples(
        suite,
        [r["text"] for r in rows],
        add_special_tokens,
        [r["continuations"] for r in rows],
        [r["ids"] for r in rows],
        flagged,
        judge,
        k,
    )


class ImportanceObjective:
    """The edited model's flagged share of the base samples' prompts, by self-normalised importance sampling."""

    def __init__(self, model: nn.Module, tokenizer, base: BaseSamples, batch_size: int = 16, progress: bool = True):
        self.tokenizer, self.base, self.batch_size, self.progress = tokenizer, base, batch_size, progress
        self.base_logp = self._logp(model)

    def _logp(self, model: nn.Module) -> torch.Tensor:
        b = self.base
        logp, _ = continuation_logprobs(
            model,
            self.tokenizer,
            [t for t in b.texts for _ in range(b.k)],
            [ids for per_prompt in b.ids for ids in per_prompt],
            batch_size=self.batch_size,
            add_special_tokens=b.add_special_tokens,
            progress=self.progress,
            desc=f"{b.suite} teacher-forced",
        )
        return logp

    def measure(self, model: nn.Module) -> ImportanceEstimate:
        log_ratio = (self._logp(model) - self.base_logp).view(len(self.base.texts), self.base.k)
        return self_normalised_rate(log_ratio, self.base.flagged)


class HumanContinuationObjective:
    """Judge-free: how an edit shifts the likelihood of human toxic continuations relative to non-toxic ones."""

    def __init__(self, model: nn.Module, tokenizer, settings: EvalSettings, threshold: float = 0.5):
        docs = [
            d
            for d in suite_documents("rtp", settings)
            if d.get("continuation") and d.get("continuation_toxicity") is not None
        ]
        if not docs:
            raise SurgeryError("no RTP records with a human continuation and its toxicity in range")
        self.tokenizer, self.settings = tokenizer, settings
        texts, chat = format_for(tokenizer, "rtp", [d["prompt"] for d in docs], settings)
        self.texts, self.add_special = texts, False if chat else None
        self.continuations = [d["continuation"] for d in docs]
        self.toxic = torch.tensor([d["continuation_toxicity"] >= threshold for d in docs])
        if self.toxic.all() or not self.toxic.any():
            raise SurgeryError(f"the {len(docs)} RTP records in range need toxic and non-toxic human continuations")
        self.base_logp, self.tokens = self._logp(model)

    def _logp(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return continuation_logprobs(
            model,
            self.tokenizer,
            self.texts,
            self.continuations,
            batch_size=self.settings.batch_size,
            add_special_tokens=self.add_special,
            progress=self.settings.progress,
            desc="rtp human continuations",
        )

    def measure(self, model: nn.Module) -> dict:
        logp, _ = self._logp(model)
        per_token = (logp - self.base_logp) / self.tokens.clamp_min(1)
        return likelihood_shift(per_token, self.toxic)
