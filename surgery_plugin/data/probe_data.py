"""The probe's labelled data sets by name: ``davidson``, ``toxigen`` (probe-side groups), ``rtp``
(documents set aside for probes), ``sst2`` (attitude), ``safeedit`` (jailbreak), a local CSV/JSONL, or
several joined with ``+``. Every set keeps to the indices :mod:`.splits` gives probes.

``self`` (the model's own judged continuations) needs a model and a judge:
:mod:`surgery_plugin.evaluation.self_data`; :func:`surgery_plugin.pipeline.load_probe_data` resolves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..core.probe import BehaviorData
from ..core.provenance import labeled_texts_sha256
from ..errors import SurgeryError
from .loaders import (
    _read_jsonl,
    balanced,
    file_digest,
    load_davidson,
    load_rtp,
    load_safeedit,
    load_toxigen_demonstrations,
    read_csv,
    read_label,
    sst2_range,
)
from .splits import RTP_BENIGN, RTP_CHALLENGING, SAFEEDIT, SST2, TOXIGEN_PROBE_GROUPS


def load_rtp_probe_documents(data_dir=None) -> BehaviorData:
    """RealToxicityPrompts documents (prompt + continuation) set aside for probes: challenging records
    ``RTP_CHALLENGING["probe"]`` and non-challenging ``RTP_BENIGN["probe"]``; toxic (1) when the prompt's or the
    continuation's Perspective toxicity is >= 0.5."""
    parts = [
        (load_rtp(data_dir, "toxic"), RTP_CHALLENGING["probe"]),
        ([r for r in load_rtp(data_dir, "nontoxic") if not r.get("challenging")], RTP_BENIGN["probe"]),
    ]
    texts, labels = [], []
    for records, (start, end) in parts:
        for r in records[start:end]:
            scores = [r.get(k, {}).get("toxicity") for k in ("prompt", "continuation")]
            if any(s is None for s in scores):
                continue
            texts.append((r["prompt"]["text"] + r["continuation"]["text"]).strip())
            labels.append(int(max(scores) >= 0.5))
    return BehaviorData(
        texts,
        labels,
        f"rtp_documents challenging{list(RTP_CHALLENGING['probe'])} "
        f"nontoxic{list(RTP_BENIGN['probe'])} n={len(texts)} sha256:{labeled_texts_sha256(texts, labels)}",
    )


def _toxigen_probe_groups(data_dir=None, max_per_class=None, seed: int = 0) -> BehaviorData:
    data = load_toxigen_demonstrations(data_dir, TOXIGEN_PROBE_GROUPS)
    texts, labels = balanced(data.texts, data.labels, max_per_class, seed)
    return BehaviorData(texts, labels, f"{data.description} max_per_class={max_per_class} seed={seed}")


def _rtp_probe(data_dir=None, max_per_class=None, seed: int = 0) -> BehaviorData:
    data = load_rtp_probe_documents(data_dir)
    texts, labels = balanced(data.texts, data.labels, max_per_class, seed)
    return BehaviorData(texts, labels, f"{data.description} max_per_class={max_per_class} seed={seed}")


def _sst2_probe(data_dir=None, max_per_class=None, seed: int = 0) -> BehaviorData:
    """Attitude probe: SST-2 test ``SST2["probe"]``, negative (the undesired attitude) -> 1, positive -> 0."""
    rows = sst2_range(data_dir, "probe")
    texts, labels = balanced([r["text"] for r in rows], [1 - r["label"] for r in rows], max_per_class, seed)
    _, start, end = SST2["probe"]
    return BehaviorData(
        texts,
        labels,
        f"sst2 test[{start}:{end}] negative=1 n={len(texts)} max_per_class={max_per_class} "
        f"seed={seed} sha256:{labeled_texts_sha256(texts, labels)}",
    )


def _safeedit_probe(data_dir=None, max_per_class=None, seed: int = 0) -> BehaviorData:
    """Jailbreak probe: SafeEdit records ``SAFEEDIT["probe"]``, the adversarial prompt and the bare question, each
    followed by the unsafe generation (complied, 1) or the safe generation (refused, 0)."""
    start, end = SAFEEDIT["probe"]
    texts, labels = [], []
    for record in load_safeedit(data_dir)[start:end]:
        question = record.get("generalization test", {}).get("test input of only harmful question") or record.get(
            "question"
        )
        for prompt in (record["adversarial prompt"], question):
            for key, label in (("unsafe generation", 1), ("safe generation", 0)):
                if prompt and record.get(key):
                    texts.append(f"{prompt.strip()} {record[key].strip()}")
                    labels.append(label)
    texts, labels = balanced(texts, labels, max_per_class, seed)
    return BehaviorData(
        texts,
        labels,
        f"safeedit records[{start}:{end}] prompt + unsafe(1)/safe(0) generation n={len(texts)} "
        f"sha256:{labeled_texts_sha256(texts, labels)}",
    )


# probe data sets that need no model; "a+b" joins several (each balanced on its own)
# probe data that needs the model or its tokenizer, made in pipeline.load_probe_data: the model's own judged
# continuations, and instructions in its chat template
MODEL_DATASETS = ("self", "instructions")
BEHAVIOR_DATASETS = {
    "davidson": load_davidson,
    "toxigen": _toxigen_probe_groups,
    "rtp": _rtp_probe,
    "sst2": _sst2_probe,
    "safeedit": _safeedit_probe,
}


def join(parts: Sequence[BehaviorData]) -> BehaviorData:
    """Several labelled sets as one (texts in order), the description naming each."""
    return BehaviorData(
        [t for d in parts for t in d.texts],
        [label for d in parts for label in d.labels],
        " + ".join(d.description for d in parts),
    )


def load_behavior_data(name: str, data_dir=None, max_per_class: int | None = None, seed: int = 0) -> BehaviorData:
    """Probe training data by name (``davidson``, ``toxigen``, ``rtp``, or several joined with ``+``), or a local
    CSV/JSONL with ``text`` and ``label`` (1 = undesired)."""
    if "+" in name:
        return join([load_behavior_data(part, data_dir, max_per_class, seed) for part in name.split("+") if part])
    if name in BEHAVIOR_DATASETS:
        return BEHAVIOR_DATASETS[name](data_dir, max_per_class=max_per_class, seed=seed)
    path = Path(name)
    if path.suffix in (".csv", ".jsonl") and path.is_file():
        if path.suffix == ".csv":
            numbered = read_csv(path, ("text", "label"))
        else:
            numbered = list(enumerate(_read_jsonl(path), 1))  # one object per non-empty line
            missing = next((n for n, r in numbered if not {"text", "label"} <= set(r)), None)
            if missing is not None:
                raise SurgeryError(f"{path}:{missing}: needs 'text' and 'label'")
        texts = [str(r["text"]) for _, r in numbered]
        labels = [read_label(r["label"], path, n) for n, r in numbered]
        if not texts:
            raise SurgeryError(f"{path} has no rows")
        texts, labels = balanced(texts, labels, max_per_class, seed)
        return BehaviorData(texts, labels, f"file:{path.name} sha256:{file_digest(path)} n={len(texts)} seed={seed}")
    raise SurgeryError(
        f"unknown probe data '{name}'; use one of {', '.join([*BEHAVIOR_DATASETS, *MODEL_DATASETS])} "
        "or a .csv/.jsonl file with text,label"
    )
