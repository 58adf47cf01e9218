"""What ``surgery tune`` reports: the trade-off front of the trials, each trial's record, and the plot."""

from __future__ import annotations

from pathlib import Path

from ...evaluation.report import pyplot, save_figure

OBJECTIVES = ("undesired", "kl", "ppl_increase")


def pareto_front(values: list[list[float]]) -> list[int]:
    """Indices of the points no other point dominates (every objective minimised)."""

    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))

    return [i for i, v in enumerate(values) if not any(dominates(w, v) for w in values)]


def trial_record(trial, on_front: bool) -> dict:
    return {
        "number": trial.number,
        "values": dict(zip(OBJECTIVES, trial.values, strict=True)),
        "undesired_se": trial.user_attrs.get("objective_se"),
        "effective_samples": trial.user_attrs.get("effective_samples"),
        "human_continuations": trial.user_attrs.get("human_continuations"),
        "on_front": on_front,
        "params": trial.user_attrs.get("params"),
        "rates": trial.user_attrs.get("rates"),
        "token_perplexity": trial.user_attrs.get("token_perplexity"),
        "seconds": trial.user_attrs.get("seconds"),
        "feasible": all(v <= 0 for v in trial.user_attrs.get("constraints", [0.0])),
    }


def plot_front(result: dict, png: Path) -> None:
    """Toxic objective against perplexity increase (colour: KL), the front joined, the chosen point starred."""
    plt = pyplot("the study without front.png")
    if plt is None:
        return
    trials = result["trials"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [100 * t["values"]["ppl_increase"] for t in trials]
    ys = [t["values"]["undesired"] for t in trials]
    kls = [t["values"]["kl"] for t in trials]
    errors = [t.get("undesired_se") or 0.0 for t in trials]
    ax.errorbar(xs, ys, yerr=[1.96 * e for e in errors], fmt="none", ecolor="grey", alpha=0.5, lw=0.8, zorder=1)
    points = ax.scatter(xs, ys, c=kls, cmap="viridis", s=28, edgecolor="none", zorder=2)
    fig.colorbar(points, ax=ax, label="mean next-token KL on benign prompts")
    front = sorted((t for t in trials if t["on_front"]), key=lambda t: t["values"]["ppl_increase"])
    ax.plot(
        [100 * t["values"]["ppl_increase"] for t in front],
        [t["values"]["undesired"] for t in front],
        color="black",
        lw=1,
        alpha=0.5,
        label="Pareto front (undesired, KL, perplexity; joined by perplexity)",
    )
    chosen = result["chosen"]["tuning"]
    ax.scatter(
        [100 * chosen["values"]["ppl_increase"]],
        [chosen["values"]["undesired"]],
        marker="*",
        s=320,
        color="gold",
        edgecolor="black",
        zorder=5,
        label=f"chosen: trial {chosen['number']}",
    )
    limit = result["settings"].get("max_ppl_increase")
    if limit is not None:
        ax.axvline(100 * limit, color="grey", ls="--", lw=1, label=f"perplexity +{100 * limit:g}%")
    ax.axhline(1.0, color="black", lw=0.5)
    # a broken edit (perplexity x9) would squeeze every useful point against the axis: cut the x axis
    # at 4x the constraint and mark the points beyond it at the edge
    right = max(4 * 100 * (limit if limit is not None else 0.1), 100 * chosen["values"]["ppl_increase"] * 1.5)
    beyond = [(x, y) for x, y in zip(xs, ys, strict=True) if x > right]
    if beyond:
        ax.scatter([right] * len(beyond), [y for _, y in beyond], marker=">", s=40, color="grey", clip_on=False)
        ax.annotate(
            f"{len(beyond)} trial(s) beyond +{right:.0f}%",
            (0.98, 0.02),
            xycoords="axes fraction",
            ha="right",
            fontsize=7,
            color="grey",
        )
        ax.set_xlim(min(min(xs), 0) - 1, right * 1.02)
    ax.set_xlabel("token perplexity increase on benign text (%)")
    objective = result.get("objective", {})
    ax.set_ylabel(
        f"undesired share / unedited's\n({objective.get('kind', 'greedy')}, {objective.get('judge', 'judges')}; "
        "bars: 95% interval)"
    )
    ax.set_title(
        f"surgery tune: {result['settings']['model']}, {len(trials)} trials (tuning splits)\n"
        f"chosen: the cheapest not distinguishable from the best",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png.parent, png.name)
    plt.close(fig)
