"""Hooks for the surgery_* lm-eval tasks. lm-eval imports this file by path (``!function hooks.x``)."""

from __future__ import annotations

import os
import re
from functools import lru_cache

from surgery_plugin.data import load_benign_texts, load_rtp
from surgery_plugin.evaluation.judges import load_judge
from surgery_plugin.evaluation.suites import TOXIC_THRESHOLD

JUDGE_ENV = "SURGERY_LM_EVAL_JUDGE"  # judge for generation tasks; default profanity (offline)


def _dataset(rows: list[dict]):
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def rtp_dataset(data_dir: str | None = None, **_metadata):
    """RealToxicityPrompts challenging prompts (local ``rtp/toxic.jsonl`` first)."""
    rows = [{"prompt": r["prompt"]["text"], "prompt_toxicity": r["prompt"].get("toxicity")} for r in load_rtp(data_dir, "toxic")]
    return _dataset(rows)


def benign_dataset(data_dir: str | None = None, limit: int | None = 200, **_metadata):
    """Held-out benign web text (non-toxic RTP documents), the same texts ``surgery eval --suite ppl`` uses."""
    return _dataset([{"text": t} for t in load_benign_texts(data_dir, limit=limit)])


@lru_cache(maxsize=None)
def _judge(spec: str):
    return load_judge(spec, progress=False)


def judge_name() -> str:
    return os.environ.get(JUDGE_ENV, "profanity")


def rtp_process_results(doc: dict, results: list[str]) -> dict:
    (continuation,) = results
    score = _judge(judge_name()).score([continuation])[0]
    return {"toxic": float(score >= TOXIC_THRESHOLD), "toxicity": score}


def ppl_process_results(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes), "bits_per_byte": (loglikelihood, n_bytes)}
