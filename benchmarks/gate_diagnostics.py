"""Gate diagnostics of an edit, per edited layer: does the probe point where the gate reads, and which way
does the push move the selected rows' activation? (surgery_plugin/core/diagnostics.py says what each is.)

For the shipped YAML of a model (or any ``--hparams``): cos(probe direction, d_l) with d_l the gate input's
toxic-minus-benign mean, |d_l|, the share of selected rows whose toxic-text pre-activation is below the
activation's minimum, and the change of the selected rows' activation per unit step on toxic vs. benign
tokens. Texts: toxic, the RTP documents set aside for probes (``probe_data: rtp``, toxic class, never in a
report); benign, RTP non-toxic documents ``RTP_BENIGN["reference"]``. Writes JSON and a plot.

    OMP_NUM_THREADS=1 python benchmarks/gate_diagnostics.py --model smollm2-135m \\
        --hparams hparams/Surgery/smollm2-135m.yaml --out benchmarks/results/gate_diagnostics_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from surgery_plugin.config import SurgeryHyperParams
from surgery_plugin.core.diagnostics import gate_diagnostics
from surgery_plugin.core.provenance import package_versions
from surgery_plugin.data.loaders import load_benign_texts
from surgery_plugin.data.probe_data import load_rtp_probe_documents
from surgery_plugin.data.splits import RTP_BENIGN
from surgery_plugin.io.files import write_json
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import build_edit

SUMMARY_KEYS = (
    "cos_probe_contrast",
    "cos_vector_contrast",
    "contrast_norm",
    "rows_below_minimum",
    "row_tokens_below_minimum",
    "slope_undesired",
    "slope_benign",
    "change_at_step_undesired",
    "change_at_step_benign",
)


def summarise(per_layer: dict) -> dict:
    """Each key's mean over layers, and over rows (layers weighted by their selected rows)."""
    out = {}
    rows = {layer: r["rows"] for layer, r in per_layer.items()}
    for key in SUMMARY_KEYS:
        values = {layer: r[key] for layer, r in per_layer.items() if r[key] is not None}
        if not values:
            out[key] = None
            continue
        out[key] = sum(values.values()) / len(values)
        weight = sum(rows[layer] for layer in values)
        out[f"{key}_row_weighted"] = sum(v * rows[layer] for layer, v in values.items()) / weight if weight else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hparams", default="hparams/Surgery/smollm2-135m.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override an hparam (YAML value), repeatable"
    )
    parser.add_argument("--texts", type=int, default=100, help="toxic and benign texts each")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/gate_diagnostics_smollm2.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    hp = SurgeryHyperParams.from_hparams(args.hparams)
    overrides = dict(item.split("=", 1) for item in args.set)
    hp = hp.replace(**{key: yaml.safe_load(value) for key, value in overrides.items()})
    model, tok = load_model(args.model)
    built = build_edit(model, tok, hp, data_dir=args.data_dir)
    edit = built.edit
    start, end = RTP_BENIGN["reference"]
    benign = load_benign_texts(args.data_dir, limit=min(args.texts, end - start), start=start)
    rtp = load_rtp_probe_documents(args.data_dir)
    toxic = [t for t, label in zip(rtp.texts, rtp.labels, strict=True) if label == 1][: args.texts]
    layers = sorted(edit.regions.rows)
    result = gate_diagnostics(
        model,
        tok,
        edit.regions.rows,
        {layer: edit.direction_of(layer) for layer in layers},
        edit.step,
        built.probe.direction,
        {"undesired": toxic, "benign": benign},
        batch_size=8,
        max_length=args.max_length,
    )
    report = {
        "model": args.model,
        "hparams": str(args.hparams),
        "overrides": overrides,
        "edit": {
            k: edit.metadata[k] for k in ("alpha", "step", "normalize", "top_k", "num_rows", "probe_project_out")
        },
        "probe": {
            "data": built.data.description if built.data is not None else None,
            "layer": hp.probe_layer,
            "pooling": hp.pooling,
            "method": hp.probe_method,
            "test_auc": built.probe.metadata.get("test_auc"),
        },
        "texts": {
            "toxic": f"{rtp.description}, toxic class, first {len(toxic)}",
            "benign": f"rtp/nontoxic.jsonl [{start}:{start + len(benign)}]",
            "max_length": args.max_length,
        },
        "activation_minimum": result["activation_minimum"],
        "mean_over_layers": summarise(result["per_layer"]),
        "per_layer": result["per_layer"],
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
        "versions": package_versions(),
        "command": (
            f"python benchmarks/gate_diagnostics.py --model {args.model} --hparams {args.hparams} "
            f"--texts {args.texts} --max-length {args.max_length} --threads {args.threads}"
            + "".join(f" --set {item}" for item in args.set)
        ),
    }
    write_json(args.out, report)
    plot(report, Path(args.out).with_suffix(".png"))
    print(json.dumps(report["mean_over_layers"], indent=1))


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgery_plugin.evaluation.report import save_figure

    per_layer = report["per_layer"]
    layers = sorted(int(k) for k in per_layer)

    def series(key):
        return [
            per_layer[str(layer)][key] if per_layer[str(layer)][key] is not None else float("nan") for layer in layers
        ]

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].plot(layers, series("cos_probe_contrast"), marker="o", ms=3, label="probe direction")
    axes[0].plot(layers, series("cos_vector_contrast"), marker="x", ms=3, label="vector added")
    axes[0].set_title("cos(direction, gate-input toxic - benign mean)", fontsize=9)
    axes[0].legend(fontsize=8)
    axes[1].plot(layers, series("contrast_norm"), marker="o", ms=3, color="#555")
    axes[1].set_title("|gate-input toxic - benign mean|", fontsize=9)
    axes[2].plot(layers, series("rows_below_minimum"), marker="o", ms=3, label="rows (mean pre-activation)")
    axes[2].plot(layers, series("row_tokens_below_minimum"), marker="x", ms=3, label="(row, token) pairs")
    axes[2].set_ylim(0, 1)
    minimum = report["activation_minimum"]
    axes[2].set_title(
        f"selected rows below the activation's minimum ({minimum:.3f})" if minimum else "n/a", fontsize=9
    )
    axes[2].legend(fontsize=8)
    for text, colour in (("undesired", "#c0392b"), ("benign", "#2a7ab9")):
        axes[3].plot(layers, series(f"slope_{text}"), marker="o", ms=3, color=colour, label=f"{text} tokens")
    axes[3].axhline(0, color="black", lw=0.5)
    axes[3].set_title("d activation / d step of the selected rows", fontsize=9)
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("edited layer")
    changed = "".join(f", {k}={v}" for k, v in report.get("overrides", {}).items())
    fig.suptitle(f"{report['model']} ({report['hparams']}{changed}): gate diagnostics", fontsize=10)
    fig.tight_layout()
    save_figure(fig, png.parent, png.name)
    plt.close(fig)


if __name__ == "__main__":
    main()
