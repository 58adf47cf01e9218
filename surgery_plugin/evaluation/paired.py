"""Two arms on the same prompts and seeds (the unedited and the edited model), compared prompt by prompt.

For every generation suite and judge: the share of continuations the judge scores at or above the
threshold (toxic, harmful, unsafe, negative, complying: what the suite measures) in each arm, its paired
change with a 95% percentile-bootstrap interval over prompts, the discordant pairs (prompts that became
clean / became flagged) and the exact McNemar p-value; and the change of the judge's mean score, with its
interval. Suites whose rows record a refusal by the GCG strings get that outcome too. Tables print
``-0.077 [-0.110, -0.043]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.statistics import mcnemar_exact, paired_bootstrap
from .metrics import TOXIC_THRESHOLD, is_missing

# what "score >= threshold" means in each generation suite (lower is better for all of them)
FLAGGED = {
    "rtp": "toxic",
    "toxigen": "toxic",
    "safeedit": "unsafe",
    "advbench": "harmful",
    "attitude": "negative",
    "false_refusal": "complying",
}


def _rows_by_suite(samples: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in samples:
        if row.get("suite") in FLAGGED and row.get("decoding", "greedy") == "greedy":
            out.setdefault(row["suite"], []).append(row)
    return out


def _outcome(before: list, after: list, n_boot: int, seed: int) -> dict:
    keep = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a is not None and b is not None]
    a = [bool(before[i]) for i in keep]
    b = [bool(after[i]) for i in keep]
    change, low, high = paired_bootstrap([float(x) for x in a], [float(x) for x in b], n_boot, seed)
    gained, lost, p = mcnemar_exact(a, b)
    return {
        "n": len(keep),
        "before": sum(a) / len(a) if a else None,
        "after": sum(b) / len(b) if b else None,
        "change": change,
        "ci95": [low, high],
        "became_flagged": gained,
        "became_clean": lost,
        "mcnemar_p": p,
    }


def paired_changes(
    before: Sequence[dict],
    after: Sequence[dict],
    threshold: float = TOXIC_THRESHOLD,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """The paired comparison of two runs' ``samples.jsonl`` rows (the same prompts, in the same order)."""
    by_before, by_after = _rows_by_suite(before), _rows_by_suite(after)
    out = {}
    for suite in by_before.keys() & by_after.keys():
        a, b = by_before[suite], by_after[suite]
        if [r["prompt"] for r in a] != [r["prompt"] for r in b]:
            raise ValueError(f"suite {suite}: the two runs did not see the same prompts in the same order")
        outcomes, scores = {}, {}
        for judge in a[0].get("scores", {}).keys() & b[0].get("scores", {}).keys():
            sa = [r["scores"].get(judge) for r in a]
            sb = [r["scores"].get(judge) for r in b]
            flag = (
                [None if is_missing(s) else s >= threshold for s in sa],
                [None if is_missing(s) else s >= threshold for s in sb],
            )
            outcomes[f"{FLAGGED[suite]}/{judge}"] = _outcome(*flag, n_boot, seed)
            change, low, high = paired_bootstrap(
                [float("nan") if is_missing(s) else s for s in sa],
                [float("nan") if is_missing(s) else s for s in sb],
                n_boot,
                seed,
            )
            valid = [(x, y) for x, y in zip(sa, sb, strict=True) if not (is_missing(x) or is_missing(y))]
            scores[judge] = {
                "before": sum(x for x, _ in valid) / len(valid) if valid else None,
                "after": sum(y for _, y in valid) / len(valid) if valid else None,
                "change": change,
                "ci95": [low, high],
            }
        if "refused" in a[0] and "refused" in b[0]:
            outcomes["refused/strings"] = _outcome([r["refused"] for r in a], [r["refused"] for r in b], n_boot, seed)
        out[suite] = {"n": len(a), "outcomes": outcomes, "mean_scores": scores}
    return {"suites": out, "threshold": threshold, "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95}}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def paired_table(paired: dict) -> str:
    """Markdown: one row per suite and outcome, ``before -> after``, the change with its interval, McNemar, and
    (when random-direction controls ran) the range of the changes they made."""
    controls = paired.get("controls")
    head = "| suite | outcome / judge | n | before | after | change [95% CI] | became flagged / clean | McNemar p |"
    lines = [
        head + (" control band |" if controls else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if controls else ""),
    ]
    for suite, entry in sorted(paired["suites"].items()):
        for name, o in sorted(entry["outcomes"].items()):
            low, high = o["ci95"]
            row = (
                f"| {suite} | {name} | {o['n']} | {o['before']:.3f} | {o['after']:.3f} | "
                f"{_fmt(o['change'])} [{_fmt(low)}, {_fmt(high)}] | {o['became_flagged']} / {o['became_clean']} | "
                f"{o['mcnemar_p']:.2g} |"
            )
            if controls:
                band = controls.get(suite, {}).get(name)
                row += f" [{_fmt(band['range'][0])}, {_fmt(band['range'][1])}] |" if band else " n/a |"
            lines.append(row)
    return "\n".join(lines)
