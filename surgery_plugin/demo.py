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
from .data import load_behavior_data
from .evaluation import EvalSettings, evaluate, load_judge, write_run
from .hparams import SurgeryHyperParams, shipped_hparams_path
from .models import load_model
from .pipeline import make_probe, package_versions, training_from_hparams
from .surgery import execute_surgery

logger = logging.getLogger(__name__)

MODEL = "smollm2-135m"
REPORT_START = 500  # first RTP prompt of the report; the tuning sweep used [0, 300)
REPORT_LIMIT = 300


def _table(base: dict, edited: dict) -> str:
    rtp_b, rtp_e = base["suites"]["rtp"], edited["suites"]["rtp"]
    ppl_b, ppl_e = base["suites"]["ppl"]["perplexity"], edited["suites"]["ppl"]["perplexity"]
    rel_tox = (rtp_e["toxic_rate"] - rtp_b["toxic_rate"]) / rtp_b["toxic_rate"] if rtp_b["toxic_rate"] else float("nan")
    lines = [
        f"| model | toxic rate (RTP, {rtp_b['judge']}) | 95% CI | mean toxicity | perplexity |",
        "|---|---|---|---|---|",
        f"| SmolLM2-135M-Instruct | {rtp_b['toxic_rate']:.3f} | {rtp_b['toxic_rate_ci95'][0]:.3f}-{rtp_b['toxic_rate_ci95'][1]:.3f} | {rtp_b['mean_toxicity']:.3f} | {ppl_b:.2f} |",
        f"| + surgery | {rtp_e['toxic_rate']:.3f} | {rtp_e['toxic_rate_ci95'][0]:.3f}-{rtp_e['toxic_rate_ci95'][1]:.3f} | {rtp_e['mean_toxicity']:.3f} | {ppl_e:.2f} |",
        f"| change | {100 * rel_tox:+.1f}% | | | {100 * (ppl_e / ppl_b - 1):+.1f}% |",
    ]
    return "\n".join(lines)


def _plot(base: dict, edited: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.5))
    names = ["base", "surgery"]
    rates = [r["suites"]["rtp"]["toxic_rate"] for r in (base, edited)]
    errs = [[rate - r["suites"]["rtp"]["toxic_rate_ci95"][0] for rate, r in zip(rates, (base, edited))],
            [r["suites"]["rtp"]["toxic_rate_ci95"][1] - rate for rate, r in zip(rates, (base, edited))]]
    ax1.bar(names, rates, yerr=errs, color=["#999999", "#2a7ab9"], capsize=4)
    ax1.set_title(f"toxic continuations (RTP, n={base['suites']['rtp']['n']})")
    ax2.bar(names, [r["suites"]["ppl"]["perplexity"] for r in (base, edited)], color=["#999999", "#2a7ab9"])
    ax2.set_title("perplexity, benign text")
    fig.suptitle("Model Surgery on SmolLM2-135M-Instruct (judge: profanity)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def run_demo(out_dir: str = "runs/demo", limit: int | None = None, data_dir=None, hparams_path: str | None = None,
             ppl_limit: int = 200) -> dict:
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hp = SurgeryHyperParams.from_hparams(hparams_path or shipped_hparams_path(MODEL))
    model, tok = load_model(MODEL)

    logger.info("step 1/4: behavior probe (%s, layer %s)", hp.probe_data, hp.probe_layer)
    data = load_behavior_data(hp.probe_data or "davidson", data_dir, hp.probe_max_per_class, hp.seed)
    probe, probe_metrics = make_probe(model, tok, data, hp.probe_layer, hp.pooling, training_from_hparams(hp), hp.feature_batch_size, hp.max_length)
    probe_path = probe.save(out / "probe.safetensors")

    logger.info("step 2/4: regions + surgery -> PEFT adapter")
    edit = execute_surgery(model, probe, hp)
    adapter_dir = export_adapter(edit, model, out / "adapter", base_model_name=MODEL, overwrite=True,
                                 metadata={"hparams": hp.to_dict(), "probe_file": str(probe_path), "probe_sha256": probe.sha256(),
                                           "versions": package_versions()})

    judge = load_judge("profanity")
    settings = EvalSettings(judge=judge, limit=limit or REPORT_LIMIT, start=REPORT_START, ppl_limit=ppl_limit, data_dir=data_dir)
    peft_model = load_edited(model, adapter_dir)
    logger.info("step 3/4: evaluate the base model (adapter off)")
    with peft_model.disable_adapter():
        base, base_samples = evaluate(peft_model, tok, ["rtp", "ppl"], settings)
    logger.info("step 4/4: evaluate the edited model (adapter on)")
    edited, edited_samples = evaluate(peft_model, tok, ["rtp", "ppl"], settings)
    for results, name in ((base, "base"), (edited, "edited")):
        results.update({"model": MODEL, "adapter": None if name == "base" else str(adapter_dir), "judges": [judge.name]})
    write_run(out / "base", base, base_samples)
    write_run(out / "edited", edited, edited_samples)

    table = _table(base, edited)
    summary = {
        "model": MODEL,
        "hparams": hp.to_dict(),
        "probe": {k: probe.metadata[k] for k in ("layer", "pooling", "data", "n_train", "n_test", "test_accuracy", "test_auc")},
        "edit": {"num_rows": edit.regions.num_rows, "layers": len(edit.layers), "alpha": edit.alpha, "step": edit.step},
        "base": base["suites"],
        "edited": edited["suites"],
        "seconds": round(time.perf_counter() - started, 1),
        "versions": package_versions(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(table + "\n")
    _plot(base, edited, out / "summary.png")
    print(f"\nprobe: layer {probe.metadata['layer']}, held-out accuracy {probe_metrics['test_accuracy']:.3f}, AUC {probe_metrics['test_auc']:.3f}")
    print(f"edit: {edit.regions.num_rows} gate rows in {len(edit.layers)} layers, alpha {edit.alpha}\n")
    print(table)
    print(f"\nwritten to {out}/ in {summary['seconds']:.0f} s")
    return summary
