"""How much of the edit lands on benign text: the benign-component hypothesis, measured.

The edit adds ``step * v_l`` to the selected gate rows of layer ``l``, so every token's gate
pre-activation in those rows moves by ``step * v_l . x_l`` (``x_l`` = the gate's input). A probe
direction that also points along what *all* text has in common moves benign tokens as much as toxic
ones. This script measures, for a probe (the shipped YAML's by default) and its variants:

- ``cos(v, mean benign hidden state)`` at the probe layer;
- per edited layer, the mean and root-mean-square over texts of ``v_l . x_l`` (the pre-activation shift
  per unit step, each text's tokens averaged) on benign text (RTP non-toxic documents
  ``RTP_BENIGN["reference"]``) and on toxic text (the RTP documents set aside for probes,
  ``probe_data: rtp``, toxic class), their ratio, and the separation ``(toxic - benign) / benign rms``;

for the paper's direction (``probe_project_out: null``) and for the two projections. Writes JSON and a plot.

    OMP_NUM_THREADS=1 python benchmarks/benign_component.py --model smollm2-135m \\
        --hparams hparams/Surgery/smollm2-135m.yaml --out benchmarks/results/benign_component_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from surgery_plugin.config import SurgeryHyperParams
from surgery_plugin.core import architectures
from surgery_plugin.core.edit import execute_surgery
from surgery_plugin.core.features import pooled_states, resolve_layer
from surgery_plugin.core.provenance import package_versions
from surgery_plugin.core.reference import reference_needs, reference_stats
from surgery_plugin.core.regions import layer_range
from surgery_plugin.data.loaders import load_benign_texts
from surgery_plugin.data.probe_data import load_rtp_probe_documents
from surgery_plugin.data.splits import RTP_BENIGN
from surgery_plugin.io.files import write_json
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import build_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hparams", default="hparams/Surgery/smollm2-135m.yaml")
    parser.add_argument("--texts", type=int, default=200, help="benign and toxic texts each")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/benign_component_smollm2.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    hp = SurgeryHyperParams.from_hparams(args.hparams)
    model, tok = load_model(args.model)
    n_layers = len(architectures.decoder_layers(model))
    layers = layer_range(n_layers, hp.layer_range)
    probe, data = build_probe(model, tok, hp, data_dir=args.data_dir)
    metrics = probe.metadata  # the held-out metrics are part of it
    start, end = RTP_BENIGN["reference"]
    benign = load_benign_texts(args.data_dir, limit=min(args.texts, end - start), start=start)
    rtp = load_rtp_probe_documents(args.data_dir)
    toxic = [t for t, label in zip(rtp.texts, rtp.labels, strict=True) if label == 1][: args.texts]
    index = resolve_layer(model, hp.probe_layer)
    states = {}
    for name, texts in (("benign", benign), ("toxic", toxic)):
        states[name] = pooled_states(
            model, tok, texts, [index], layers, hp.pooling, hp.feature_batch_size, hp.max_length
        )

    def response(edit) -> dict:
        """Per layer: the mean gate pre-activation shift per unit step, v_l . x_l, on each text set."""
        out = {}
        for layer in layers:
            v = edit.direction_of(layer) if layer in edit.regions.rows or edit.layer_directions is None else None
            if v is None:
                continue
            row = {}
            for name in states:
                shift = states[name][1][layer] @ v  # per text: the mean shift of its tokens
                row[name], row[f"{name}_rms"] = float(shift.mean()), float(shift.square().mean().sqrt())
            row["benign_over_toxic"] = row["benign"] / row["toxic"] if row["toxic"] else None
            row["separation"] = (row["toxic"] - row["benign"]) / row["benign_rms"] if row["benign_rms"] else None
            out[str(layer)] = row
        keys = ("benign", "toxic", "benign_rms", "toxic_rms", "separation")
        summary = {key: sum(r[key] for r in out.values()) / len(out) for key in keys}
        summary["benign_over_toxic"] = summary["benign"] / summary["toxic"] if summary["toxic"] else None
        return {"per_layer": out, "mean_over_layers": summary}

    mean_benign = states["benign"][0][index].mean(0)
    direction = probe.direction / probe.direction.norm()
    result = {
        "model": args.model,
        "hparams": str(args.hparams),
        "probe": {
            "data": data.description,
            "layer": index,
            "pooling": hp.pooling,
            **{k: metrics[k] for k in ("test_accuracy", "test_auc")},
        },
        "texts": {
            "benign": f"rtp/nontoxic.jsonl non-challenging [{start}:{start + len(benign)}]",
            "toxic": f"{rtp.description}, toxic class, first {len(toxic)}",
        },
        "cos_probe_mean_benign_state": float(direction @ (mean_benign / mean_benign.norm())),
        "variants": {},
    }
    for variant in (None, "benign_mean", "gate_benign_mean"):
        point = hp.replace(probe_project_out=variant)
        needs = reference_needs(point)
        stats = (  # from the benign states above (the pipeline's own: RTP_BENIGN["reference"] too)
            reference_stats(
                states["benign"][0][index] if needs.benign_hidden else None,
                states["benign"][1] if needs.benign_gates else None,
                None,
                result["texts"]["benign"],
            )
            if needs.any
            else None
        )
        edit = execute_surgery(model, probe, point, stats)
        result["variants"][str(variant)] = response(edit)
        logging.info("%s: %s", variant, result["variants"][str(variant)]["mean_over_layers"])
    result["versions"] = package_versions()
    result["command"] = (
        f"python benchmarks/benign_component.py --model {args.model} --hparams {args.hparams} --texts {args.texts}"
    )
    write_json(args.out, result)
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: v["mean_over_layers"] for k, v in result["variants"].items()}, indent=1))
    print("cos(probe, mean benign state):", round(result["cos_probe_mean_benign_state"], 4))


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgery_plugin.evaluation.report import save_figure

    fig, axes = plt.subplots(1, len(result["variants"]), figsize=(5 * len(result["variants"]), 3.8), sharey=True)
    for ax, (name, variant) in zip(axes, result["variants"].items(), strict=True):
        layers = sorted(int(k) for k in variant["per_layer"])
        for text, colour in (("benign", "#2a7ab9"), ("toxic", "#c0392b")):
            ax.plot(
                layers,
                [variant["per_layer"][str(layer)][text] for layer in layers],
                marker="o",
                ms=3,
                color=colour,
                label=f"{text} text",
            )
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"probe_project_out: {name}", fontsize=9)
        ax.set_xlabel("edited layer")
    axes[0].set_ylabel("mean gate pre-activation shift per unit step (v_l . x_l)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['model']}: how much of the edit lands on benign vs. toxic text")
    fig.tight_layout()
    save_figure(fig, png.parent, png.name)
    plt.close(fig)


if __name__ == "__main__":
    main()
