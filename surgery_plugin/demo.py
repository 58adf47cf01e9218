"""``surgery demo``: the main job, probe -> edit -> eval (base and edited) on the embedded SmolLM2.

The edited model is the base model with the exported PEFT adapter attached; the base numbers are
taken with the adapter switched off, so both rows come from one model load and one adapter file.
RTP prompts for the report start at 500, disjoint from the tuning sweep's prompts [0, 300).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .adapter import export_adapter, load_edited
from .atomic import atomic_write
from .data import load_behavior_data
from .evaluation import EvalSettings, evaluate, load_judges, write_run
from .evaluation.report import comparison_table, save_figure
from .hparams import SurgeryHyperParams, shipped_hparams_path
from .models import load_model
from .probe import probe_from_hparams
from .provenance import package_versions
from .surgery import execute_surgery

logger = logging.getLogger(__name__)

MODEL = "smollm2-135m"
REPORT_START = 500  # first RTP prompt of the report; the tuning sweep used [0, 300)
REPORT_LIMIT = 300
DEMO_JUDGES = "profanity,minilm"  # two independent offline judges: word-level SVM, sentence embeddings


def _plot(base: dict, edited: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = list(base["suites"]["rtp"]["by_judge"])
    fig, axes = plt.subplots(1, len(judges) + 1, figsize=(4 * (len(judges) + 1), 3.5))
    names, colors = ["base", "surgery"], ["#999999", "#2a7ab9"]
    for ax, judge in zip(axes[:-1], judges, strict=True):
        stats = [r["suites"]["rtp"]["by_judge"][judge] for r in (base, edited)]
        rates = [s["toxic_rate"] for s in stats]
        errs = [
            [rate - s["toxic_rate_ci95"][0] for rate, s in zip(rates, stats, strict=True)],
            [s["toxic_rate_ci95"][1] - rate for rate, s in zip(rates, stats, strict=True)],
        ]
        ax.bar(names, rates, yerr=errs, color=colors, capsize=4)
        ax.set_title(f"toxic continuations, judge {judge}\n(RTP, n={base['suites']['rtp']['n']})", fontsize=9)
    axes[-1].bar(names, [r["suites"]["ppl"]["token_perplexity"] for r in (base, edited)], color=colors)
    axes[-1].set_title("token perplexity, benign text", fontsize=9)
    fig.suptitle("Model Surgery on SmolLM2-135M-Instruct")
    fig.tight_layout()
    save_figure(fig, png.parent, png.name)
    plt.close(fig)


def run_demo(
    out_dir: str = "runs/demo",
    limit: int | None = None,
    data_dir=None,
    hparams_path: str | None = None,
    ppl_limit: int = 200,
) -> dict:
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hp = SurgeryHyperParams.from_hparams(hparams_path or shipped_hparams_path(MODEL))
    model, tok = load_model(MODEL)

    logger.info("step 1/4: behavior probe (%s, layer %s)", hp.probe_data, hp.probe_layer)
    data = load_behavior_data(hp.probe_data or "davidson", data_dir, hp.probe_max_per_class, hp.seed)
    probe, probe_metrics = probe_from_hparams(model, tok, data, hp)
    probe_path = probe.save(out / "probe.safetensors")

    logger.info("step 2/4: regions + surgery -> PEFT adapter")
    edit = execute_surgery(model, probe, hp)
    adapter_dir = export_adapter(
        edit,
        model,
        out / "adapter",
        base_model_name=MODEL,
        overwrite=True,
        metadata={
            "hparams": hp.to_dict(),
            "probe_file": str(probe_path),
            "probe_sha256": probe.sha256(),
            "versions": package_versions(),
        },
    )

    judges = load_judges(DEMO_JUDGES)
    settings = EvalSettings(
        judges=judges, limit=limit or REPORT_LIMIT, start=REPORT_START, ppl_limit=ppl_limit, data_dir=data_dir
    )
    peft_model = load_edited(model, adapter_dir)
    logger.info("step 3/4: evaluate the base model (adapter off)")
    with peft_model.disable_adapter():
        base, base_samples = evaluate(peft_model, tok, ["rtp", "ppl"], settings)
    logger.info("step 4/4: evaluate the edited model (adapter on)")
    edited, edited_samples = evaluate(peft_model, tok, ["rtp", "ppl"], settings)
    for results, name in ((base, "base"), (edited, "edited")):
        results.update(
            {
                "model": MODEL,
                "adapter": None if name == "base" else str(adapter_dir),
                "judges": [j.name for j in judges],
            }
        )
    write_run(out / "base", base, base_samples)
    write_run(out / "edited", edited, edited_samples)

    table = comparison_table(
        [("SmolLM2-135M-Instruct", base["suites"]), ("+ surgery", edited["suites"])], ["rtp", "ppl"]
    )
    summary = {
        "model": MODEL,
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
        "base": base["suites"],
        "edited": edited["suites"],
        "seconds": round(time.perf_counter() - started, 1),
        "versions": package_versions(),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write(out / "summary.md", table + "\n")
    _plot(base, edited, out / "summary.png")
    print(
        f"\nprobe: layer {probe.metadata['layer']}, held-out accuracy {probe_metrics['test_accuracy']:.3f}, "
        f"AUC {probe_metrics['test_auc']:.3f}"
    )
    print(f"edit: {edit.regions.num_rows} gate rows in {len(edit.layers)} layers, alpha {edit.alpha}\n")
    print(table)
    print(f"\nwritten to {out}/ in {summary['seconds']:.0f} s")
    return summary
