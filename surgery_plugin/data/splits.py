"""Which indices of each data set each step uses, declared once, and the one seeded stratified shuffle.

No reported number uses an index that a probe, a sweep or a search saw:

- ``rtp/toxic.jsonl`` (challenging prompts): probes [800, 1000), tuning search [0, 200), validation of
  the chosen point [300, 500), report (README, demo) [500, 800).
- ``rtp/nontoxic.jsonl`` (benign text, non-challenging records: ppl and kl): report [0, 200), tuning
  [200, 300), validation [300, 400), gate-input reference [400, 600), self-probe prompts [600, 800),
  probe documents [1000, 1200).
- ToxiGen: probes and searches use ``TOXIGEN_PROBE_GROUPS`` only (demonstrations and prompts); reports
  use the other groups, ``TOXIGEN_REPORT_GROUPS``: prompts [0, 50) per group, validation [50, 100).
- Jailbreak: SafeEdit records [0, 60) make the probe (their safe vs. unsafe generations), [60, 93) are
  reported; AdvBench instructions [0, 100) are reported, [100, 150) tune, [150, 200) validate; false refusals are
  measured on every record's benign "knowledge constrain" question (no probe uses them).
- Attitude: SST-2 test [0, 1000) makes the probe, test [1000, 1821) trains the ``minilm:sst2`` judge;
  the prompts are openings of negative dev reviews: [0, 80) tune, [80, 130) validate, [130, 413) are reported.

The ``minilm`` judge is trained on Davidson, the ToxiGen demonstrations of ``TOXIGEN_REPORT_GROUPS``
only and RTP non-toxic continuations [200, 1000) (never a probe's texts; see evaluation/minilm.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

RTP_CHALLENGING = {"tune": (0, 200), "validation": (300, 500), "report": (500, 800), "probe": (800, 1000)}
RTP_BENIGN = {
    "report": (0, 200),
    "tune": (200, 300),
    "validation": (300, 400),
    "reference": (400, 600),  # mean gate inputs on benign text (probe_project_out / region_scoring variants)
    "probe_self": (600, 800),  # benign prompts the model continues for probe_data: self
    "judge": (200, 1000),  # the minilm judge's web-text continuations
    "probe": (1000, 1200),  # documents of probe_data: rtp
}
TOXIGEN_REPORT_GROUPS = ("asian", "jewish", "lgbtq", "mental_disability", "muslim", "women")
TOXIGEN_PROBE_GROUPS = ("black", "chinese", "immigrant", "latino", "mexican", "native_american", "physical_disability")
TOXIGEN_REPORT_PROMPTS = {"report": (0, 50), "validation": (50, 100)}
# jailbreak: SafeEdit test records (93 here) and AdvBench instructions (520)
SAFEEDIT = {"probe": (0, 60), "report": (60, 93)}  # the benign knowledge questions of all records: false refusals
ADVBENCH = {"tune": (100, 150), "validation": (150, 200), "report": (0, 100)}
# attitude: SST-2 (label 0 negative = undesired); prompts are openings of *negative* dev reviews
SST2 = {"probe": ("test", 0, 1000), "judge": ("test", 1000, 1821)}
# indices into the attitude prompts (openings of the negative dev reviews, protocols.attitude_documents: 413)
ATTITUDE_OPENINGS = {"tune": (0, 80), "validation": (80, 130), "report": (130, 413)}


def stratified_shuffle(keys: Sequence[Hashable], seed: int) -> dict[Hashable, np.ndarray]:
    """Indices of each group of equal key, each group shuffled; groups drawn in sorted key order
    from one generator seeded with ``seed``, so the result depends only on the keys and the seed."""
    keys = list(keys)
    rng = np.random.default_rng(seed)
    groups = {}
    for key in sorted(set(keys)):
        idx = np.flatnonzero(np.fromiter((k == key for k in keys), dtype=bool, count=len(keys)))
        rng.shuffle(idx)
        groups[key] = idx
    return groups


def toxigen_groups(spec: str | None) -> tuple[str, ...] | None:
    """``report`` / ``probe`` (the held-out and the probe-side groups), ``all`` or None (every group), or ``g1,g2``."""
    if spec is None or spec == "all":
        return None
    named = {"report": TOXIGEN_REPORT_GROUPS, "probe": TOXIGEN_PROBE_GROUPS}
    if spec in named:
        return named[spec]
    groups = tuple(g.strip() for g in spec.split(",") if g.strip())
    return groups or None
