"""``probe_data: self``: the model's own continuations, labelled by a judge.

``self`` is on-distribution: the direction is what *this model* does when it continues a prompt
toxically. The prompts are the ones :mod:`surgery_plugin.data.splits` sets aside for probes (RTP
challenging ``RTP_CHALLENGING["probe"]`` and non-challenging ``RTP_BENIGN["probe_self"]``), never a
tuning or reporting prompt. Each prompt gets a greedy and ``samples`` seeded nucleus continuations; a
text (prompt + continuation) is labelled undesired when the judge scores the continuation >= 0.5. The
set is cached on disk per model weights and settings. Grading a ``self`` probe with the judge that
labelled it is circular: report it with a second judge too.
"""

from __future__ import annotations

import hashlib
import json
import logging

from torch import nn

from ..core.architectures import model_name
from ..core.probe import BehaviorData
from ..core.provenance import gate_fingerprint, labeled_texts_sha256
from ..data.loaders import load_rtp
from ..data.splits import RTP_BENIGN, RTP_CHALLENGING
from ..io.cache import cache_path
from ..io.files import atomic_write
from .generation import generate_continuations
from .judges import load_judge

logger = logging.getLogger(__name__)

SELF_SAMPLES = 3  # nucleus samples per prompt, besides the greedy continuation
SELF_NEW_TOKENS = 20  # as the rtp protocol


def self_prompts(data_dir=None) -> list[str]:
    """The probe-side prompts: RTP challenging ``RTP_CHALLENGING["probe"]`` and RTP_BENIGN["probe_self"]."""
    (c0, c1), (b0, b1) = RTP_CHALLENGING["probe"], RTP_BENIGN["probe_self"]
    benign = [r for r in load_rtp(data_dir, "nontoxic") if not r.get("challenging")]
    return [r["prompt"]["text"] for r in load_rtp(data_dir, "toxic")[c0:c1]] + [
        r["prompt"]["text"] for r in benign[b0:b1]
    ]


def self_continuations(
    model: nn.Module,
    tokenizer,
    data_dir=None,
    judge: str = "minilm",
    seed: int = 0,
    samples: int | None = None,
    progress: bool = True,
) -> BehaviorData:
    """The model's own continuations of the probe-side prompts, labelled by ``judge`` (cached per weights)."""
    samples = SELF_SAMPLES if samples is None else samples
    prompts = self_prompts(data_dir)
    # the gate fingerprint: the same whether or not PEFT adapters are injected (they are switched off here)
    weights = [model_name(model), gate_fingerprint(model)]
    key_material = json.dumps(
        {
            "weights": weights,
            "prompts": labeled_texts_sha256(prompts, [0] * len(prompts)),
            "judge": judge,
            "seed": seed,
            "samples": samples,
            "tokens": SELF_NEW_TOKENS,
            "v": 1,
        }
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    path = cache_path("probe_data", f"self-{key}.json")
    if path.is_file():
        rows = json.loads(path.read_text())
    else:
        greedy = generate_continuations(
            model, tokenizer, prompts, SELF_NEW_TOKENS, progress=progress, desc="self: greedy"
        )
        sampled = (
            generate_continuations(
                model,
                tokenizer,
                prompts,
                SELF_NEW_TOKENS,
                progress=progress,
                desc="self: sampled",
                num_samples=samples,
                seed=seed,
            )
            if samples
            else [[] for _ in prompts]
        )
        pairs = [(p, c) for p, g, s in zip(prompts, greedy, sampled, strict=True) for c in [g, *s] if c.strip()]
        scores = load_judge(judge, progress=progress, data_dir=data_dir).score([c for _, c in pairs])
        rows = [{"prompt": p, "continuation": c, "score": s} for (p, c), s in zip(pairs, scores, strict=True)]
        atomic_write(path, json.dumps(rows))
    texts = [(r["prompt"] + r["continuation"]).strip() for r in rows if r["score"] == r["score"]]  # drop NaN scores
    labels = [int(r["score"] >= 0.5) for r in rows if r["score"] == r["score"]]
    (c0, c1), (b0, b1) = RTP_CHALLENGING["probe"], RTP_BENIGN["probe_self"]
    description = (
        f"self: continuations (greedy + {samples} samples, seed {seed}, {SELF_NEW_TOKENS} tokens) of rtp "
        f"challenging[{c0}:{c1}] + nontoxic[{b0}:{b1}] prompts, labelled by judge {judge} >= 0.5, "
        f"n={len(texts)} sha256:{labeled_texts_sha256(texts, labels)}"
    )
    return BehaviorData(texts, labels, description)
