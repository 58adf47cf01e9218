"""Two arms on the same prompts and seeds (the unedited and the edited model), compared prompt by prompt.

For every generation suite and judge: the share of continuations the judge scores at or above the
threshold (toxic, harmful, unsafe, negative, complying: what the suite measures) in each arm, its paired
change with a 95% percentile-bootstrap interval over prompts, the discordant pairs (prompts that became
clean / became flagged) and the exact McNemar p-value; and the change of the judge's mean score, with its
interval. Suites whose rows record a refusal by the GCG strings get that outcome too. Sampled rows (``eval
--samples k``) are compared prompt by prompt too: the flagged probability (McNemar on "any of the k samples
flagged"), the expected maximum score and the share of samples flagged, each with its interval; and on AdvBench
the share of samples refused by the GCG strings. The capability
cost is paired by document too: the relative change of token perplexity on the benign documents (interval: the
documents resampled) and the mean next-token KL from the unedited model on the benign prompts. Tables print
``-0.077 [-0.110, -0.043]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.statistics import bootstrap_pairs, mcnemar_exact, paired_bootstrap
from .metrics import TOXIC_THRESHOLD, is_missing, sample_groups

# what "score >= threshold" means in each generation suite (lower is better for all of them)
FLAGGED = {
    "rtp": "toxic",
    "toxigen": "toxic",
    "safeedit": "unsafe",
    "advbench": "harmful",
    "attitude": "negative",
    "false_refusal": "complying",
}


def _rows_by_suite(samples: Sequence[dict], decoding: str = "greedy") -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in samples:
        if row.get("suite") in FLAGGED and row.get("decoding", "greedy") == decoding:
            out.setdefault(row["suite"], []).append(row)
    return out


def _score_list(rows: Sequence[dict], judge: str) -> list[float]:
    return [float("nan") if is_missing(s := r["scores"].get(judge)) else s for r in rows]


def _mean_change(before: Sequence[float], after: Sequence[float], n_boot: int, seed: int) -> dict:
    """Means of a continuous per-prompt quantity in both arms (prompts with a missing value in either left out)
    and the paired change with its bootstrap interval."""
    change, low, high = paired_bootstrap(list(before), list(after), n_boot, seed)
    valid = [(x, y) for x, y in zip(before, after, strict=True) if x == x and y == y]  # NaN != NaN
    return {
        "n": len(valid),
        "before": sum(x for x, _ in valid) / len(valid) if valid else None,
        "after": sum(y for _, y in valid) / len(valid) if valid else None,
        "change": change,
        "ci95": [low, high],
    }


def _per_prompt(flat: Sequence, threshold: float, k: int) -> tuple[list[float], list, list[float]]:
    """Per-sample scores (k consecutive ones per prompt) -> per prompt: max score, any sample flagged (score >=
    ``threshold``), share flagged."""
    maxima, any_flagged, share = [], [], []
    for scores in sample_groups(flat, k):
        maxima.append(max(scores) if scores else float("nan"))
        any_flagged.append(any(s >= threshold for s in scores) if scores else None)
        share.append(sum(s >= threshold for s in scores) / len(scores) if scores else float("nan"))
    return maxima, any_flagged, share


def _sampled_changes(a: list[dict], b: list[dict], suite: str, threshold: float, n_boot: int, seed: int) -> dict:
    """The sampled protocol, paired by prompt: toxicity probability (McNemar on 'any sample flagged'), expected
    maximum toxicity and the share of samples flagged (bootstrap over prompts)."""
    if [(r["prompt"], r.get("sample")) for r in a] != [(r["prompt"], r.get("sample")) for r in b]:
        raise ValueError(f"suite {suite}: the two runs did not sample the same prompts the same number of times")
    k = max(r.get("sample", 0) for r in a) + 1
    outcomes, emt, share = {}, {}, {}
    for judge in sorted(a[0].get("scores", {}).keys() & b[0].get("scores", {}).keys()):
        max_a, any_a, share_a = _per_prompt(_score_list(a, judge), threshold, k)
        max_b, any_b, share_b = _per_prompt(_score_list(b, judge), threshold, k)
        outcomes[f"{FLAGGED[suite]} probability/{judge}"] = _outcome(any_a, any_b, n_boot, seed)
        emt[judge] = _mean_change(max_a, max_b, n_boot, seed)
        share[judge] = _mean_change(share_a, share_b, n_boot, seed)
    if "refused" in a[0] and "refused" in b[0]:  # the GCG strings, per sample (advbench): a refusal scores 1
        _, any_a, share_a = _per_prompt([float(r["refused"]) for r in a], 1.0, k)
        _, any_b, share_b = _per_prompt([float(r["refused"]) for r in b], 1.0, k)
        outcomes["refused probability/strings"] = _outcome(any_a, any_b, n_boot, seed)
        share["refused/strings"] = _mean_change(share_a, share_b, n_boot, seed)
    return {"k": k, "n": len(a) // k, "outcomes": outcomes, "expected_max": emt, "sample_rate": share}


def _check_same_order(a: Sequence[dict], b: Sequence[dict], suite: str, seen: str = "see the same prompts") -> None:
    """Both arms' rows of ``suite`` are of the same prompts in the same order, else a paired comparison is void."""
    if [r["prompt"] for r in a] != [r["prompt"] for r in b]:
        raise ValueError(f"suite {suite}: the two runs did not {seen} in the same order")


def _capability_changes(before: Sequence[dict], after: Sequence[dict], n_boot: int, seed: int) -> dict:
    """``ppl``: token perplexity of the benign documents in both arms and its relative change (``after / before
    - 1``), the interval from resampling documents; ``kl``: the mean next-token KL from the unedited model in both
    arms (the unedited arm's is 0 up to float error) and its change. Only what both arms measured."""
    out = {}
    a, b = ([r for r in rows if r.get("suite") == "ppl"] for rows in (before, after))
    if a and b:
        _check_same_order(a, b, "ppl", "score the same documents")
        tokens = [r["tokens"] for r in a]
        if [r["tokens"] for r in b] != tokens:
            raise ValueError("suite ppl: the two runs scored different tokens of the same documents")
        nll_change = [y["nll"] - x["nll"] for x, y in zip(a, b, strict=True)]
        change, low, high = bootstrap_pairs(
            lambda t, d: float(np.expm1(d.sum() / t.sum())) if t.sum() else float("nan"),
            tokens,
            nll_change,
            n_boot,
            seed,
        )
        n_tokens = sum(tokens)
        out["ppl"] = {
            "token perplexity (relative change)": {
                "n": len(a),
                "n_tokens": n_tokens,
                "before": float(np.exp(sum(r["nll"] for r in a) / max(n_tokens, 1))),
                "after": float(np.exp(sum(r["nll"] for r in b) / max(n_tokens, 1))),
                "change": change,
                "ci95": [low, high],
            }
        }
    a, b = ([r for r in rows if r.get("suite") == "kl"] for rows in (before, after))
    if a and b:
        _check_same_order(a, b, "kl", "score the same documents")
        kl = _mean_change([r["kl"] for r in a], [r["kl"] for r in b], n_boot, seed)
        out["kl"] = {"mean KL from the unedited model": kl}
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
    for suite in sorted(by_before.keys() & by_after.keys()):
        a, b = by_before[suite], by_after[suite]
        _check_same_order(a, b, suite)
        outcomes, scores = {}, {}
        for judge in sorted(a[0].get("scores", {}).keys() & b[0].get("scores", {}).keys()):
            sa, sb = _score_list(a, judge), _score_list(b, judge)
            flag = ([None if s != s else s >= threshold for s in sa], [None if s != s else s >= threshold for s in sb])
            outcomes[f"{FLAGGED[suite]}/{judge}"] = _outcome(*flag, n_boot, seed)
            scores[judge] = _mean_change(sa, sb, n_boot, seed)
        if "refused" in a[0] and "refused" in b[0]:
            outcomes["refused/strings"] = _outcome([r["refused"] for r in a], [r["refused"] for r in b], n_boot, seed)
        out[suite] = {"n": len(a), "outcomes": outcomes, "mean_scores": scores}
    sampled_before, sampled_after = _rows_by_suite(before, "sample"), _rows_by_suite(after, "sample")
    for suite in sorted(sampled_before.keys() & sampled_after.keys()):
        entry = _sampled_changes(sampled_before[suite], sampled_after[suite], suite, threshold, n_boot, seed)
        out.setdefault(suite, {"n": 0, "outcomes": {}, "mean_scores": {}})["sampled"] = entry
    paired = {"suites": out, "threshold": threshold, "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95}}
    capability = _capability_changes(before, after, n_boot, seed)
    if capability:
        paired["capability"] = capability
    return paired


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def format_change(o: dict | None, digits: int = 3, percent: bool = False, missing: str = "n/a") -> str:
    """A paired outcome as ``change [low, high]`` (signed; ``percent``: in percent to one decimal), the change alone
    where it has no interval, ``missing`` where it has no change."""
    if not o or o.get("change") is None:
        return missing

    def one(value: float | None) -> str:
        return f"{value:+.1%}" if percent and value is not None else _fmt(value, digits)

    if o.get("ci95") is None:
        return one(o["change"])
    low, high = o["ci95"]
    return f"{one(o['change'])} [{one(low)}, {one(high)}]"


def _plain(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def outcome_rows(suite: str, entry: dict) -> list[tuple[str, str, dict]]:
    """``(label, outcome name, outcome)`` of one suite's paired entry: its greedy outcomes under ``suite``, and its
    sampled ones (any sample flagged, expected max, sample rate per judge) under ``"<suite> k=<k>"``: the rows of
    the paired table and the keys of the control band."""
    rows = [(suite, name, o) for name, o in sorted(entry["outcomes"].items())]
    sampled = entry.get("sampled")
    if sampled:
        label = f"{suite} k={sampled['k']}"
        rows += [(label, name, o) for name, o in sorted(sampled["outcomes"].items())]
        rows += [(label, f"expected max/{j}", o) for j, o in sorted(sampled["expected_max"].items())]
        rows += [(label, f"sample rate/{j}", o) for j, o in sorted(sampled["sample_rate"].items())]
    return rows


def comparison_rows(paired: dict) -> list[tuple[str, str, dict]]:
    """``(label, outcome name, outcome)`` of every row of a paired comparison: each suite's outcomes
    (:func:`outcome_rows`), then the capability cost (perplexity, KL)."""
    rows = [row for suite, entry in sorted(paired["suites"].items()) for row in outcome_rows(suite, entry)]
    for suite, outcomes in sorted(paired.get("capability", {}).items()):
        rows += [(suite, name, o) for name, o in sorted(outcomes.items())]
    return rows


def paired_table(paired: dict) -> str:
    """Markdown: one row per suite and outcome, ``before -> after``, the change with its interval, McNemar, and
    (when random-direction controls ran) the range of the changes they made."""
    controls = paired.get("controls")
    head = "| suite | outcome / judge | n | before | after | change [95% CI] | became flagged / clean | McNemar p |"
    lines = [
        head + (" control band |" if controls else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if controls else ""),
    ]
    for shown, name, o in comparison_rows(paired):
        discordant = f"{o['became_flagged']} / {o['became_clean']}" if "became_flagged" in o else ""
        p = f"{o['mcnemar_p']:.2g}" if "mcnemar_p" in o else ""
        before, after = (_plain(v) if shown != "ppl" or v is None else f"{v:.2f}" for v in (o["before"], o["after"]))
        row = f"| {shown} | {name} | {o['n']} | {before} | {after} | {format_change(o)} | {discordant} | {p} |"
        if controls:
            band = controls.get(shown, {}).get(name)
            row += f" [{_fmt(band['range'][0])}, {_fmt(band['range'][1])}] |" if band else " |"
        lines.append(row)
    return "\n".join(lines)
