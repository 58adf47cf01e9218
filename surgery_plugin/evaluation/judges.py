"""Toxicity judges: ``name -> Judge`` with one method, ``score(texts) -> P(toxic)`` per text.

Every result records the judge's ``name`` so numbers from different judges are never mixed.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from tqdm.auto import tqdm

from ..errors import SurgeryError


class Judge(Protocol):
    name: str

    def score(self, texts: Sequence[str]) -> list[float]:
        """Probability that each text is toxic, in [0, 1]."""


class ProfanityJudge:
    """alt-profanity-check: a linear SVM (calibrated) on Davidson + Jigsaw; weights ship in the wheel.

    It sees words, not meaning: it catches profanity and slurs, and misses polite hate.
    """

    name = "profanity"

    def __init__(self, batch_size: int = 512, progress: bool = True):
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise SurgeryError("judge 'profanity' needs `pip install alt-profanity-check` (or the [eval] extra)") from None
        self._predict_prob = predict_prob
        self.batch_size = batch_size
        self.progress = progress

    def score(self, texts: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc=f"judge:{self.name}", disable=not self.progress or len(texts) <= self.batch_size):
            batch = [t if t.strip() else " " for t in texts[start : start + self.batch_size]]
            scores.extend(float(p) for p in self._predict_prob(batch))
        return scores


JUDGES: dict[str, Callable[..., Judge]] = {"profanity": ProfanityJudge}


def load_judge(spec: str, progress: bool = True) -> Judge:
    """A judge by name (``profanity``); ``name:argument`` forms are passed to the judge."""
    name, _, argument = spec.partition(":")
    if name not in JUDGES:
        raise SurgeryError(f"unknown judge '{spec}'; available: {', '.join(sorted(JUDGES))}")
    factory = JUDGES[name]
    return factory(argument, progress=progress) if argument else factory(progress=progress)
