"""``surgery demo``: the main job, probe -> edit -> eval (base and edited) on an embedded model, for one behavior.

The edited model is the base model with the exported PEFT adapter attached; the base numbers are
taken with the adapter switched off, so both rows come from one model load and one adapter file.
Every number is on the *report* splits of :mod:`surgery_plugin.data.splits`, which no probe,
sweep or search saw (toxicity: RTP challenging prompts [500, 800), the ToxiGen groups
``TOXIGEN_REPORT_GROUPS``, prompts [0, 50) of each; benign documents [0, 200) for perplexity and KL).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..behaviors import check_behavior, hparams_for
from ..config import SurgeryHyperParams
from ..core.architectures import ModelGates
from ..core.provenance import package_versions
from ..errors import SurgeryError
from ..evaluation.judges import load_judges
from ..evaluation.paired import paired_changes, paired_table
from ..evaluation.protocols import PROTOCOLS, plan
from ..evaluation.report import (
    comparison_table,
    group_comparison,
    metric_values,
    plot_paired_changes,
    pyplot,
    save_figure,
)
from ..evaluation.runner import evaluate_plan, write_run_files
from ..io.adapter import load_edited, write_adapter
from ..io.files import check_target, json_text, output, write_manifest
from ..models import EMBEDDED_MODELS, load_model
from ..pipeline import build_edit
from .evaluate import control_band, evaluate_controls

logger = logging.getLogger(__name__)

MODEL = "smollm2-135m"


def _plot(base: dict, edited: dict, png: Path, title: str, suites: list[str], paired: dict) -> None:
    """The headline judged rates of each suite (one panel per judge), base vs. edited, and perplexity; below,
    every paired change with its 95% interval and, where controls ran, their band."""
    plt = pyplot("the demo without summary.png")
    if plt is None:
        return
    panels = [
        (suite, metric, judge)
        for suite in suites
        if suite in PROTOCOLS
        for metric in PROTOCOLS[suite].metrics
        if metric.headline and metric.percent
        for judge in metric_values(base["suites"][suite], metric)
    ]
    fig = plt.figure(figsize=(3.2 * (len(panels) + 1), 7.5))
    grid = fig.add_gridspec(2, len(panels) + 1)
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(panels) + 1)]
    names, colors = ["base", "surgery"], ["#999999", "#2a7ab9"]
    for ax, (suite, metric, judge) in zip(axes[:-1], panels, strict=True):
        values = [metric_values(r["suites"][suite], metric)[judge] for r in (base, edited)]
        rates = [v for v, _ in values]
        errs = [
            [max(0, v - ci[0]) if ci else 0 for v, ci in values],
            [max(0, ci[1] - v) if ci else 0 for v, ci in values],
        ]
        ax.bar(names, rates, yerr=errs, color=colors, capsize=4)
        who = "" if judge == "-" else f", {judge}"
        ax.set_title(f"{suite} {metric.key}{who}\n(n={base['suites'][suite].get('n')})", fontsize=7)
    axes[-1].bar(names, [r["suites"]["ppl"]["token_perplexity"] for r in (base, edited)], color=colors)
    axes[-1].set_title(f"token perplexity\n(KL {edited['suites']['kl']['mean_kl']:.4f})", fontsize=8)
    plot_paired_changes(fig.add_subplot(grid[1, :]), paired)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, png.parent, png.name)
    plt.close(fig)


def run_demo(
    out_dir: str = "runs/demo",
    limit: int | None = None,
    data_dir=None,
    hparams_path: str | None = None,
    ppl_limit: int | None = None,
    model_name: str = MODEL,
    behavior_name: str = "toxicity",
    controls: int = 2,
) -> dict:
    """Probe, edit and evaluate ``model_name`` for one behavior with its shipped YAML (or ``hparams_path``)."""
    started = time.perf_counter()
    path = hparams_path or hparams_for(model_name, behavior_name)
    hp = SurgeryHyperParams.from_hparams(path)
    spec = check_behavior(hp, behavior_name, str(path))
    out = check_target(out_dir, "demo", overwrite=True)  # only an earlier demo there is replaced
    model, tok = load_model(model_name)
    if spec.applies_to_chat_models_only and not getattr(tok, "chat_template", None):
        raise SurgeryError(f"behavior '{behavior_name}' applies to chat models; {model_name} has no chat template")
    with output(out, "demo", overwrite=True) as tmp:  # written whole: a stopped demo leaves the last one
        summary, _ = _run(
            model, tok, hp, spec, model_name, behavior_name, out, tmp, limit, ppl_limit, data_dir, controls
        )
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "summary.json").write_text(json_text(summary), encoding="utf-8")
        write_manifest(tmp, {"kind": "demo", "model": model_name, "behavior": behavior_name}, names=["summary.json"])
    print(f"\nwritten to {out}/ in {summary['seconds']:.0f} s")
    return summary


def _run(
    model, tok, hp, spec, model_name, behavior_name, out: Path, tmp: Path, limit, ppl_limit, data_dir, controls: int
):
    """Probe, edit, adapter, base and edited runs, ``controls`` random-direction edits of the same size on the
    headline suite, summary table and plot, written into ``tmp`` (to become ``out``)."""
    logger.info("step 1/4: behavior probe (%s: %s, layer %s)", behavior_name, hp.probe_data, hp.probe_layer)
    logger.info("step 2/4: regions + surgery -> PEFT adapter")
    probe, _, edit = build_edit(model, tok, hp.replace(probe_data=hp.probe_data or spec.probe_data), data_dir=data_dir)
    probe.save(tmp / "probe.safetensors")
    metadata = {
        "hparams": hp.to_dict(),
        "probe_file": str(out / "probe.safetensors"),
        "probe_sha256": probe.sha256(),
        "behavior": behavior_name,
        "versions": package_versions(),
    }
    (tmp / "adapter").mkdir()
    write_adapter(edit, ModelGates(model), tmp / "adapter", base_model_name=model_name, metadata=metadata)

    judges = load_judges(spec.judges, data_dir=data_dir)
    settings = plan(spec.suites, "report", judges, data_dir, limit=limit, ppl_limit=ppl_limit)
    peft_model = load_edited(model, tmp / "adapter")
    logger.info("step 3/4: evaluate the base model (adapter off)")
    with peft_model.disable_adapter():
        base, base_samples = evaluate_plan(peft_model, tok, settings)
    logger.info("step 4/4: evaluate the edited model (adapter on)")
    edited, edited_samples = evaluate_plan(peft_model, tok, settings)
    for results, name in ((base, "base"), (edited, "edited")):
        results.update(
            {
                "model": model_name,
                "behavior": behavior_name,
                "judges": [j.name for j in judges],
                "adapter": None if name == "base" else str(out / "adapter"),
            }
        )
    write_run_files(tmp / "base", base, base_samples)
    write_run_files(tmp / "edited", edited, edited_samples)

    display = EMBEDDED_MODELS[model_name].name.split(" (")[0] if model_name in EMBEDDED_MODELS else model_name
    text = comparison_table([(display, base["suites"]), ("+ surgery", edited["suites"])], list(spec.suites))
    if "toxigen" in spec.suites:
        groups = group_comparison([("base", base["suites"]["toxigen"]), ("edited", edited["suites"]["toxigen"])])
        text += f"\n\nToxiGen by held-out target group:\n\n{groups}"
    paired = paired_changes(base_samples, edited_samples)  # the same prompts in both arms: compared prompt by prompt
    headline_suite = spec.metric[0]
    if controls:  # the null edit: same rows, layers and step, random directions; on the headline suite (time)
        logger.info("controls: %d random-direction edits of the same size on %s", controls, headline_suite)
        measured = evaluate_controls(
            peft_model, tok, {headline_suite: settings[headline_suite]}, tmp / "adapter", controls
        )
        paired["controls"] = control_band(base_samples, measured)
    text += (
        "\n\nPaired changes, prompt by prompt (95% bootstrap interval over prompts; exact McNemar p of the "
        "prompts that became flagged vs. clean"
        + (
            f"; control band: the range of the changes {controls} random-direction edits of the same rows, "
            f"layers and step made on the same {headline_suite} prompts"
            if controls
            else ""
        )
        + f"):\n\n{paired_table(paired)}"
    )
    summary = {
        "model": model_name,
        "behavior": behavior_name,
        "hparams": hp.to_dict(),
        "probe": {
            k: probe.metadata[k]
            for k in ("layer", "pooling", "data", "n_train", "n_test", "test_accuracy", "test_auc")
        },
        "edit": {
            "num_rows": edit.regions.num_rows,
            "layers": len(edit.layers),
            "alpha": edit.alpha,
            "step": edit.step,
        },
        "settings": base["settings"],
        "base": base["suites"],
        "edited": edited["suites"],
        "paired": paired,
        "versions": package_versions(),
    }
    (tmp / "summary.md").write_text(text + "\n", encoding="utf-8")
    _plot(base, edited, tmp / "summary.png", f"Model Surgery on {display}: {behavior_name}", list(spec.suites), paired)
    print(
        f"\nprobe: layer {probe.metadata['layer']}, held-out accuracy {probe.metadata['test_accuracy']:.3f}, "
        f"AUC {probe.metadata['test_auc']:.3f} ({hp.probe_data})"
    )
    print(f"edit: {edit.regions.num_rows} gate rows in {len(edit.layers)} layers, alpha {edit.alpha}\n")
    print(text)
    return summary, text
