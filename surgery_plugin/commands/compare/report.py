"""``surgery compare``'s outputs: the table, the markdown page, the trade-off plot, and which methods failed."""

from __future__ import annotations

from pathlib import Path

from ...evaluation.paired import format_change, paired_table
from ...evaluation.protocols import PROTOCOLS
from ...evaluation.report import comparison_table, metric_values, pyplot, save_figure
from ...io.files import json_text, write_manifest


def _gb(value) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f} GB"


def _size(value) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _count(value) -> str:
    return "n/a" if value is None else f"{value:,}"


def cost_cells(entry: dict) -> dict[str, str]:
    cost = entry.get("cost") or {}
    memory = _gb(cost.get("peak_rss_bytes"))
    if cost.get("edit_rss_bytes") is not None:
        memory += f" (+{cost['edit_rss_bytes'] / 1e6:.0f} MB)"
    return {
        "edit time": "n/a" if cost.get("edit_seconds") is None else f"{cost['edit_seconds']:.1f} s",
        "peak memory (+ during edit)": memory,
        "changed params": _count(cost.get("changed_params")),
        "saved edit": _size(cost.get("edit_bytes")),
    }


def cost_ratios(result: dict) -> list[tuple[str, str, dict[str, float | None]]]:
    """(surgery row, baseline row, {cost: surgery / baseline}) for every pair that ran."""
    methods = result["methods"]
    out = []
    for s in ("surgery-shipped", "surgery-records"):
        for b in ("steering", "ablation", "dinm", "rome", "ft-l", "ft-m"):
            if methods.get(s, {}).get("status") != "ok" or methods.get(b, {}).get("status") != "ok":
                continue
            sc, bc = methods[s]["cost"], methods[b]["cost"]
            out.append(
                (
                    s,
                    b,
                    {
                        k: (sc[k] / bc[k] if sc.get(k) is not None and bc.get(k) else None)
                        for k in ("edit_seconds", "peak_rss_bytes", "edit_rss_bytes", "changed_params", "edit_bytes")
                    },
                )
            )
    return out


def result_table(result: dict) -> str:
    """The comparison table: one row per method, its headline numbers per judge, then its costs."""
    suites = [x for x in result["settings"]["suites"] if x in PROTOCOLS]
    methods = result["methods"].values()
    runs = [(m["label"] + ("" if m["status"] == "ok" else " — **failed**"), m["suites"]) for m in methods]
    return comparison_table(
        runs, suites, change_from_first=False, extra=[cost_cells(m) for m in methods], label="method"
    )


def prompt_ranges(prompts: dict[str, dict]) -> str:
    """Which prompts each global-edit suite read, from ``compare.json["settings"]["prompts"]`` (the settings
    of each suite as :meth:`EvalSettings.describe` records them)."""
    parts = []
    for suite, p in prompts.items():
        if suite in ("ppl", "kl"):
            parts.append(f"{suite} benign documents [{p['benign_start']}, {p['benign_start'] + p['ppl_limit']})")
        elif p.get("toxigen_groups"):
            per_group = p["limit"] // len(p["toxigen_groups"])
            groups = ", ".join(p["toxigen_groups"])
            parts.append(f"{suite} lines [{p['start']}, {p['start'] + per_group}) of groups {groups}")
        else:
            parts.append(f"{suite} [{p['start']}, {'end' if p['limit'] is None else p['start'] + p['limit']})")
    return "; ".join(parts) or "none"


def render_markdown(result: dict, plot: str | None) -> str:
    s, methods = result["settings"], result["methods"]
    suites = [x for x in s["suites"] if x in PROTOCOLS]
    lines = [
        "# Surgery vs. baselines",
        "",
        f"Model **{s['model']}**; judges {', '.join(s['judges'])}; {s['records']} edit record(s); "
        f"{s['limit']} prompts per generation suite; seed {s['seed']}; {s['torch_threads']} torch thread(s); "
        f"{s['seconds'] / 60:.1f} min.",
        "",
        *(
            [f"**Partial** (`--reuse-only`): not measured yet: {', '.join(s['not_measured'])}.", ""]
            if s.get("not_measured")
            else []
        ),
        result_table(result),
        "",
        "Rates are shares of generations a judge scores >= 0.5, with 95% Wilson intervals; SafeEdit DS / DG_avg "
        "are shares judged *safe* (higher is better). KL: mean KL(unedited || edited) of the next-token "
        "distribution on benign prompts. Memory: peak resident set during the global edit (loaded model "
        "included), and what the edit added.",
        "",
        "## Protocols and data",
        "",
    ]
    for p in s["protocols"].values():
        lines.append(f"- **{p['title']}**: {p['edit_records']}; {p['evaluation']}.")
    lines += [
        f"- Edit records (global): {s['edit_records']['range']} ids {s['edit_records']['ids']}; per instance: "
        f"{s['instance_records']['range']} ids {s['instance_records']['ids']}.",
        f"- Prompts (the report split of each suite): {prompt_ranges(s['prompts'])}. None of them was seen by "
        "an edit, a probe or the tuning sweep.",
        "",
        "## Methods",
        "",
    ]
    for name, m in methods.items():
        status = "" if m["status"] == "ok" else f" **Failed:** `{m['error']}`."
        edit = m.get("edit") or {}
        where = f" Saved: `{edit['folder']}` ({edit['kind']})." if edit.get("folder") else ""
        layers = f" Located layers: {edit['located_layers']}." if edit.get("located_layers") else ""
        lines.append(f"- **{m['label']}** (`{name}`): {m['description']}.{where}{layers}{status}")
    ratios = cost_ratios(result)
    if ratios:
        lines += [
            "",
            "## Surgery's cost relative to each baseline",
            "",
            "| surgery row | baseline | edit time | peak memory | edit memory | changed params | saved edit |",
            "|---|---|---|---|---|---|---|",
        ]
        for surgery, baseline, r in ratios:
            cells = ["n/a" if r[k] is None else f"{r[k]:.3g}x" for k in r]
            lines.append(f"| {methods[surgery]['label']} | {baseline} | " + " | ".join(cells) + " |")
    for measure in MEASURES:
        lines += _equal_effect_section(result, measure)
    paired = {name: m["paired"] for name, m in methods.items() if m.get("paired") and "suites" in m["paired"]}
    if paired:
        lines += [
            "",
            "## Paired changes against the unedited model",
            "",
            "Every method saw the unedited row's prompts in the same order: the change of each rate prompt by "
            "prompt, with a 95% bootstrap interval over prompts and the exact McNemar p.",
        ]
        for name, table in paired.items():
            lines += ["", f"**{methods[name]['label']}**", "", paired_table(table)]
    tuning = methods.get("steering", {}).get("tuning")
    if tuning:
        judge = tuning["judge"]
        lines += [
            "",
            "## Steering's strength, chosen on the tuning split",
            "",
            f"RTP tune [0, {tuning['limit']}) greedy, toxic rate by {judge}; perplexity on {tuning['limit']} tuning "
            f"documents; constraint: perplexity within +{tuning['max_ppl_increase']:.0%} of the unedited model's "
            f"({tuning['unedited']['token_perplexity']:.2f}, toxic rate "
            f"{tuning['unedited']['toxic_rate'][judge]:.3f}). "
            f"Chosen: {tuning['chosen_scale']:g} of the mean residual norm"
            + ("" if tuning["met_constraint"] else " (no strength met the constraint: the weakest)")
            + ".",
            "",
            "| strength (x residual norm) | toxic rate | perplexity | within constraint |",
            "|---|---|---|---|",
        ]
        for p in tuning["points"]:
            lines.append(
                f"| {p['scale']:g} | {p['toxic_rate'][judge]:.3f} | {p['token_perplexity']:.2f} | "
                f"{'yes' if p['feasible'] else 'no'} |"
            )
    curve = surgery_curve(result)
    if curve:
        lines += [
            "",
            "## Surgery's alpha curve",
            "",
            "The shipped edit rescaled with `set_alpha` (one model load); alpha 0 is the unedited model.",
            "",
            comparison_table(
                [(f"{a:g}", sx) for a, sx in curve],
                [x for x in suites if all(x in sx for _, sx in curve)],
                change_from_first=False,
                label="alpha",
            ),
        ]
    if plot:
        lines += ["", f"![trade-off]({plot})"]
    lines += [
        "",
        f"Made by `{s.get('command') or 'surgery compare'}` on {s['created']}; settings in compare.json.",
        "",
    ]
    return "\n".join(lines)


CHEAPER_BY = 20.0  # the claim "Surgery is at least this many times cheaper at equal or better effect"
COST_KEYS = ("edit_seconds", "peak_rss_bytes", "edit_bytes")


MEASURES = {
    "greedy": "toxic rate, greedy",
    "sampled": "share of toxic samples, sampled protocol",
}


def measure_outcome(paired: dict | None, suite: str, judge: str, measure: str) -> dict | None:
    """One method's outcome of ``measure`` on ``suite`` by ``judge`` in a paired comparison: the greedy toxic rate
    or the sampled protocol's share of toxic samples (the measure with the most power: k samples per prompt)."""
    entry = ((paired or {}).get("suites") or {}).get(suite) or {}
    if measure == "sampled":
        return ((entry.get("sampled") or {}).get("sample_rate") or {}).get(judge)
    return (entry.get("outcomes") or {}).get(f"toxic/{judge}")


def equal_effect_rows(result: dict, measure: str = "greedy") -> list[dict]:
    """Per method that ran (not Surgery as shipped): its headline change (``measure``, see :data:`MEASURES`, on the
    first toxicity suite by the first judge, paired with the unedited model), its difference from Surgery's on the
    same prompts, whether its effect is better / not distinguishable / worse than Surgery's (the difference's
    interval), its costs over Surgery's, and whether "Surgery is >= CHEAPER_BY x cheaper at equal or better
    effect" holds against it: the method is not better, and every cost it has is at least CHEAPER_BY times
    Surgery's (edit time; memory and size where the method has them). Empty where Surgery or the measure did not
    run."""
    methods, settings = result["methods"], result["settings"]
    surgery = methods.get("surgery-shipped", {})
    judge = settings["judges"][0]
    ran = [s for s in ("rtp", "toxigen") if s in settings["suites"]]
    # the first toxicity suite where Surgery has the measure (--sample-suites may leave rtp greedy only)
    with_measure = [s for s in ran if measure_outcome(surgery.get("paired"), s, judge, measure)]
    suite = (with_measure or ran or [None])[0]
    if surgery.get("status") != "ok" or suite is None:
        return []
    s_cost = surgery.get("cost") or {}
    rows = []
    for name, m in methods.items():
        if (
            name in ("unedited", "surgery-shipped")
            or m["status"] != "ok"
            or "suites" not in (m.get("vs_surgery") or {})
        ):
            continue
        change = measure_outcome(m.get("paired"), suite, judge, measure)
        minus = measure_outcome(m["vs_surgery"], suite, judge, measure)
        if minus is None:
            continue
        low, high = minus["ci95"]
        verdict = "better" if high < 0 else "worse" if low > 0 else "not distinguishable"
        base_ppl = (methods.get("unedited", {}).get("suites", {}).get("ppl") or {}).get("token_perplexity")
        ppl = (m["suites"].get("ppl") or {}).get("token_perplexity")
        ppl_increase = ppl / base_ppl - 1 if ppl is not None and base_ppl else None
        limit = settings.get("max_ppl_increase", 0.10)
        outside = ppl_increase is not None and ppl_increase > limit
        if outside:  # an effect bought with a broken model is not an equal effect
            verdict += f", but perplexity {ppl_increase:+.1%} (over +{limit:.0%})"
        cost = m.get("cost") or {}
        ratio = {k: (cost[k] / s_cost[k] if cost.get(k) is not None and s_cost.get(k) else None) for k in COST_KEYS}
        measured = [r for r in ratio.values() if r is not None]
        better = verdict.startswith("better") and not outside
        holds = not better and bool(measured) and all(r >= CHEAPER_BY for r in measured)
        claim = "yes" if holds else ("no (better effect)" if better else "no")
        rows.append(
            {
                "name": name,
                "suite": suite,
                "judge": judge,
                "measure": measure,
                "change": change,
                "minus_surgery": minus,
                "verdict": verdict,
                "cost_ratio": ratio,
                "ppl_increase": ppl_increase,
                "claim": claim,
            }
        )
    return rows


def _equal_effect_section(result: dict, measure: str) -> list[str]:
    """The markdown of :func:`equal_effect_rows` for one measure ([] where it did not run)."""
    methods, equal = result["methods"], equal_effect_rows(result, measure)
    if not equal:
        return []
    judge, suite = equal[0]["judge"], equal[0]["suite"]
    lines = [
        "",
        f"## Cost at equal effect: {suite}, {MEASURES[measure]}",
        "",
        f"Effect: the paired change of the {suite} {MEASURES[measure]}, by {judge}, against the unedited model, "
        "and each method's difference from Surgery as shipped on the same prompts (its interval: a paired "
        "bootstrap). Each method was measured at one setting (its shipped YAML; steering: the strength chosen on "
        "the tuning split), so its cost is the cost of its measured effect, whether or not that reaches Surgery's; "
        "an effect with perplexity over the search constraint is marked, and does not count as better than "
        f"Surgery's. Costs are the method's over Surgery's; the claim tested is \"Surgery is >= {CHEAPER_BY:g}x "
        'cheaper at equal or better effect".',
        "",
        "| method | change vs unedited [95% CI] | minus Surgery's [95% CI] | effect vs Surgery | edit time | "
        "peak memory | saved edit | claim holds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    own = measure_outcome(methods["surgery-shipped"].get("paired"), suite, judge, measure)
    lines.append(f"| **{methods['surgery-shipped']['label']}** | {format_change(own)} | 0 | - | 1x | 1x | 1x | - |")
    for e in equal:
        ratios = " | ".join("n/a" if e["cost_ratio"][k] is None else f"{e['cost_ratio'][k]:.3g}x" for k in COST_KEYS)
        lines.append(
            f"| {methods[e['name']]['label']} | {format_change(e['change'])} | {format_change(e['minus_surgery'])} | "
            f"{e['verdict']} | {ratios} | {e['claim']} |"
        )
    return lines


def surgery_curve(result: dict) -> list[tuple[float, dict]]:
    """``(alpha, suites)`` of the shipped surgery edit at every alpha measured, the unedited model as alpha 0."""
    shipped, unedited = result["methods"].get("surgery-shipped", {}), result["methods"].get("unedited", {})
    if shipped.get("status") != "ok" or not shipped.get("curve"):
        return []
    points = {0.0: unedited.get("suites", {}), shipped["edit"]["alpha"]: shipped["suites"]}
    points.update({c["alpha"]: c["suites"] for c in shipped["curve"]})
    return sorted(points.items())


def _tradeoff_points(result: dict, suite: str, judge: str, cost_key: tuple[str, str]) -> list[tuple]:
    """(label, x, y, ci) of every ok row that has both numbers."""
    points = []
    for m in result["methods"].values():
        if m["status"] != "ok":
            continue
        y = metric_values(m["suites"].get(suite, {}), PROTOCOLS[suite].metric("toxic_rate")).get(judge)
        x = (m["suites"].get(cost_key[0]) or {}).get(cost_key[1])
        if y and y[0] is not None and x is not None:
            points.append((m["label"], x, y[0], y[1]))
    return points


def write_tradeoff_plot(out: Path, result: dict) -> str | None:
    """``tradeoff.png``: toxic rate (RTP, else ToxiGen; one row of panels per judge) against KL and perplexity;
    Surgery's alpha curve as a line, every other row as a point."""
    suites = result["settings"]["suites"]
    tox = next((s for s in ("rtp", "toxigen") if s in suites), None)
    costs = [c for c in (("kl", "mean_kl"), ("ppl", "token_perplexity")) if c[0] in suites]
    if tox is None or not costs:
        return None
    plt = pyplot("compare.md without tradeoff.png")
    if plt is None:
        return None
    judges = result["settings"]["judges"]
    fig, axes = plt.subplots(len(judges), len(costs), figsize=(5.2 * len(costs), 4.0 * len(judges)), squeeze=False)
    markers = "osD^vP*Xh<>"
    labels = [m["label"] for m in result["methods"].values() if m["status"] == "ok"]
    curve = surgery_curve(result)
    for i, judge in enumerate(judges):
        for j, cost in enumerate(costs):
            ax = axes[i][j]
            for label, x, y, ci in _tradeoff_points(result, tox, judge, cost):
                k = labels.index(label)
                err = [[y - ci[0]], [ci[1] - y]] if ci and ci[0] is not None else None
                ax.errorbar([x], [y], yerr=err, fmt=markers[k % len(markers)], color=f"C{k}", capsize=3, label=label)
            pts = []
            for alpha, sx in curve:
                y = metric_values(sx.get(tox, {}), PROTOCOLS[tox].metric("toxic_rate")).get(judge)
                x = (sx.get(cost[0]) or {}).get(cost[1])
                if y and y[0] is not None and x is not None:
                    pts.append((alpha, x, y[0]))
            if len(pts) > 1:
                ax.plot([p[1] for p in pts], [p[2] for p in pts], "-", color="#2a7ab9", alpha=0.5, zorder=0)
                for alpha, x, y in pts:
                    ax.annotate(
                        f"α={alpha:g}", (x, y), fontsize=7, color="#2a7ab9", xytext=(4, -9), textcoords="offset points"
                    )
            ax.set_xlabel(
                "mean KL(unedited || edited), benign prompts" if cost[0] == "kl" else "token perplexity, benign text"
            )
            ax.set_ylabel(f"toxic rate ({'RTP' if tox == 'rtp' else 'ToxiGen'}), judge {judge}")
            if cost[0] == "kl":
                ax.set_xscale("symlog", linthresh=1e-3)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8, frameon=False)
    fig.suptitle(
        f"{result['settings']['model']}: toxic rate vs. capability cost (lower left is better; "
        "bars: 95% intervals; line: Surgery's alpha curve)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(names) // 4), 1, 0.97))
    name = save_figure(fig, out, "tradeoff.png")
    plt.close(fig)
    return name


def failed_methods(result: dict) -> list[str]:
    return [n for n, m in result["methods"].items() if m["status"] != "ok"]


def write_outputs(out: Path, result: dict) -> None:
    """``compare.md`` with the plot, and ``compare.json`` last (what the run produced, whole)."""
    plot = write_tradeoff_plot(out, result)
    (out / "compare.md").write_text(render_markdown(result, plot), encoding="utf-8")
    (out / "compare.json").write_text(json_text(result), encoding="utf-8")
    write_manifest(out, {"kind": "compare", "model": result["settings"]["model"]}, names=["compare.json"])
