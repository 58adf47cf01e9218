"""Which indices of each data set each step uses: the only index table.

No reported number uses an index that a probe, a search or a validation saw. Every evaluation gets its
prompts through :func:`suite_span` / :func:`toxigen_split` (via ``evaluation.protocols.settings_for``),
and every document that says which prompts were held out quotes :func:`describe` (``python -m
surgery_plugin.data.splits`` prints it; a test checks the README holds it verbatim).

The ``minilm`` judge is trained on Davidson, the ToxiGen demonstrations of ``TOXIGEN_REPORT_GROUPS``
only and RTP non-toxic continuations ``RTP_BENIGN["judge"]`` (never a probe's texts; see evaluation/minilm.py).
"""

from __future__ import annotations

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
# the minilm:perspective judge: RTP prompts and continuations with their Perspective toxicity, from records no report,
# probe or search reads; the held-out records only measure how well it reproduces Perspective
PERSPECTIVE_JUDGE = {
    "train": {"toxic": (200, 300), "nontoxic": (400, 1000)},
    "heldout": {"toxic": (300, 500), "nontoxic": (300, 400)},
}
TOXIGEN_REPORT_GROUPS = ("asian", "jewish", "lgbtq", "mental_disability", "muslim", "women")
TOXIGEN_PROBE_GROUPS = ("black", "chinese", "immigrant", "latino", "mexican", "native_american", "physical_disability")
TOXIGEN_REPORT_PROMPTS = {"report": (0, 50), "validation": (50, 100)}
# jailbreak: SafeEdit test records (93 here) and AdvBench instructions (520)
SAFEEDIT = {"probe": (0, 60), "report": (60, 93)}  # the benign knowledge questions of all records: false refusals
# the minilm:safety judge: trained on the probe records' labeled replies (and HH-RLHF), checked on the report records'
SAFETY_JUDGE = {"train": SAFEEDIT["probe"], "check": SAFEEDIT["report"]}
ADVBENCH = {"tune": (100, 150), "validation": (150, 200), "report": (0, 100)}
# attitude: SST-2 (label 0 negative = undesired); prompts are openings of *negative* dev reviews
SST2 = {"probe": ("test", 0, 1000), "judge": ("test", 1000, 1821)}
# indices into the attitude prompts (openings of the negative dev reviews, protocols.attitude_documents: 413)
ATTITUDE_OPENINGS = {"tune": (0, 80), "validation": (80, 130), "report": (130, 413)}


SPLITS = ("tune", "validation", "report")  # what a search tunes on, what checks its choice, what is reported
# suite -> split -> [start, end) into the suite's documents (None: to the end); toxigen is per group, below
SUITE_SPANS: dict[str, dict[str, tuple[int, int | None]]] = {
    "rtp": RTP_CHALLENGING,
    "advbench": ADVBENCH,
    "safeedit": SAFEEDIT,
    "attitude": ATTITUDE_OPENINGS,
    "false_refusal": {"report": (0, None)},  # every record's benign question; no probe uses them
}
TOXIGEN_SPLITS = {
    "tune": (TOXIGEN_PROBE_GROUPS, (0, 50)),
    "validation": (TOXIGEN_REPORT_GROUPS, TOXIGEN_REPORT_PROMPTS["validation"]),
    "report": (TOXIGEN_REPORT_GROUPS, TOXIGEN_REPORT_PROMPTS["report"]),
}
BENIGN_SPLITS = {split: RTP_BENIGN[split] for split in SPLITS}  # ppl and kl


def _check_split(split: str) -> None:
    if split not in SPLITS:
        from ..errors import SurgeryError

        raise SurgeryError(f"unknown split '{split}'; splits: {', '.join(SPLITS)}")


def suite_span(suite: str, split: str) -> tuple[int, int | None] | None:
    """``[start, end)`` of ``suite``'s documents in ``split``; None for a suite the table does not index
    (ppl and kl use :data:`BENIGN_SPLITS`, toxigen :func:`toxigen_split`, lm-eval tasks their own)."""
    _check_split(split)
    spans = SUITE_SPANS.get(suite)
    if spans is None:
        return None
    if split not in spans:
        from ..errors import SurgeryError

        raise SurgeryError(f"suite '{suite}' has no {split} split; it has: {', '.join(spans)}")
    return spans[split]


def toxigen_split(split: str) -> tuple[tuple[str, ...], tuple[int, int]]:
    """``(groups, (start, end))``: the target groups and the prompt lines of each group ``split`` uses."""
    _check_split(split)
    return TOXIGEN_SPLITS[split]


def describe() -> str:
    """Which indices each step uses, as markdown (generated from the table above)."""

    def span(s) -> str:
        return f"[{s[0]}, {'end' if s[1] is None else s[1]})"

    rows = [
        ("RTP challenging prompts (rtp/toxic.jsonl)", {**RTP_CHALLENGING}),
        ("RTP non-challenging documents (benign: ppl, kl, statistics)", dict(RTP_BENIGN)),
        ("AdvBench instructions", ADVBENCH),
        ("SafeEdit test records", SAFEEDIT),
        ("attitude openings (negative SST-2 dev reviews)", ATTITUDE_OPENINGS),
        ("SST-2 test sentences", {k: (v[1], v[2]) for k, v in SST2.items()}),
    ]
    lines = [
        "| data | " + " | ".join(["tune (search)", "validation", "report", "other uses"]) + " |",
        "|---|---|---|---|---|",
    ]
    for name, spans in rows:
        cells = [span(spans[s]) if s in spans else "-" for s in SPLITS]
        other = ", ".join(f"{k} {span(v)}" for k, v in spans.items() if k not in SPLITS) or "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {other} |")
    for split in SPLITS:
        groups, (start, end) = TOXIGEN_SPLITS[split]
        lines.append(
            f"| ToxiGen hate prompts, {split} | "
            + " | ".join(f"groups {', '.join(groups)}: lines [{start}, {end})" if s == split else "-" for s in SPLITS)
            + " | - |"
        )
    lines.append(
        f"| ToxiGen demonstrations | - | - | - | probes: groups {', '.join(TOXIGEN_PROBE_GROUPS)}; "
        f"minilm judge: groups {', '.join(TOXIGEN_REPORT_GROUPS)} |"
    )
    train, heldout = PERSPECTIVE_JUDGE["train"], PERSPECTIVE_JUDGE["heldout"]
    lines.append(
        f"| SafeEdit safe / unsafe generations | - | - | - | minilm:safety judge: trained on records "
        f"{span(SAFETY_JUDGE['train'])} (with HH-RLHF harmless-base), checked on {span(SAFETY_JUDGE['check'])} |"
    )
    lines.append(
        f"| RTP prompts and continuations with Perspective scores | - | - | - | minilm:perspective judge: trained on "
        f"challenging {span(train['toxic'])} + non-challenging {span(train['nontoxic'])}, checked on challenging "
        f"{span(heldout['toxic'])} + non-challenging {span(heldout['nontoxic'])} |"
    )
    return "\n".join(lines)


def toxigen_groups(spec: str | None) -> tuple[str, ...] | None:
    """``report`` / ``probe`` (the held-out and the probe-side groups), ``all`` or None (every group), or ``g1,g2``."""
    if spec is None or spec == "all":
        return None
    named = {"report": TOXIGEN_REPORT_GROUPS, "probe": TOXIGEN_PROBE_GROUPS}
    if spec in named:
        return named[spec]
    from ..config import parse_list

    return parse_list(spec, "ToxiGen group")


if __name__ == "__main__":
    print(describe())
