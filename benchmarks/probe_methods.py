"""Held-out quality of each probe recipe: method (the paper's Adam head, difference of means, logistic
regression solved to convergence) x pooling (mean, mean without the first token, last token, mean after the final
norm), at one layer.

Features of every pooling come from the same forward passes (``features.state_batches``). Each recipe is
trained on the probe data's training split (``probe_test_fraction`` held out, as ``surgery probe`` does) and
scored on (a) that held-out split and (b) RTP documents set aside for probes (``probe_data: rtp``: another
distribution, the kind of text the edit is measured on; no report uses them). Also: cos between each
recipe's direction and the difference of means of the same pooling. Writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/probe_methods.py --model smollm2-135m --layer 10 \\
        --out benchmarks/results/probe_methods_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from surgery_plugin.config import SurgeryHyperParams
from surgery_plugin.core import architectures
from surgery_plugin.core.features import POOLINGS, pool, resolve_layer, state_batches
from surgery_plugin.core.probe import ProbeTraining, train_probe
from surgery_plugin.core.provenance import package_versions
from surgery_plugin.core.statistics import roc_auc
from surgery_plugin.data.probe_data import load_rtp_probe_documents
from surgery_plugin.io.files import write_json
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import load_probe_data

METHODS = ("linear", "mean_difference", "logistic")


def pooled_all_ways(model, tok, texts, index: int, max_length: int, desc: str) -> dict[str, torch.Tensor]:
    """``hidden_states[index]`` of ``texts`` pooled every way in :data:`POOLINGS`, from one pass per batch."""
    out = {p: torch.empty(len(texts), 0) for p in POOLINGS}
    parts: dict[str, list] = {p: [] for p in POOLINGS}
    order: list[int] = []
    norm = None if index == architectures.full_num_layers(model) else architectures.final_norm(model)
    for batch, hidden, _, mask in state_batches(model, tok, texts, [index], (), 16, max_length, desc=desc):
        order += batch
        for p in POOLINGS:
            parts[p].append(pool(hidden[index], mask, p, norm))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.as_tensor(order)] = torch.arange(len(order))
    for p in POOLINGS:
        out[p] = torch.cat(parts[p])[inverse]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hparams", default="hparams/Surgery/smollm2-135m.yaml", help="probe data, per-class cap")
    parser.add_argument("--layer", type=int, default=None, help="default: the hparams' probe_layer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/probe_methods_smollm2.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    hp = SurgeryHyperParams.from_hparams(args.hparams)
    layer = hp.probe_layer if args.layer is None else args.layer
    model, tok = load_model(args.model)
    index = resolve_layer(model, layer)
    data = load_probe_data(hp.probe_data, model, tok, args.data_dir, hp.probe_max_per_class, hp.seed)
    other = load_rtp_probe_documents(args.data_dir)
    features = pooled_all_ways(model, tok, data.texts, index, hp.max_length, "probe data")
    other_features = pooled_all_ways(model, tok, other.texts, index, hp.max_length, "rtp probe documents")
    other_labels = torch.as_tensor(other.labels).numpy()
    rows = []
    for pooling in POOLINGS:
        reference = None
        for method in METHODS:
            t0 = time.perf_counter()
            training = ProbeTraining.from_hparams(hp.replace(probe_method=method))
            probe, metrics = train_probe(features[pooling], data.labels, training, progress=False)
            direction = probe.direction / probe.direction.norm()
            if method == "mean_difference":
                reference = direction
            row = {
                "pooling": pooling,
                "method": method,
                "heldout_auc": metrics["test_auc"],
                "heldout_accuracy": metrics["test_accuracy"],
                "rtp_probe_documents_auc": roc_auc(probe.score(other_features[pooling]).numpy(), other_labels),
                "seconds": time.perf_counter() - t0,
                "direction": direction,
            }
            if method == "logistic":
                row["logistic"] = metrics["logistic"]
            rows.append(row)
            logging.info("%s / %s: held-out AUC %.4f", pooling, method, metrics["test_auc"])
        for row in rows:
            if row["pooling"] == pooling:
                row["cos_mean_difference"] = float(row.pop("direction") @ reference)
    report = {
        "model": args.model,
        "layer": index,
        "probe_data": data.description,
        "n": len(data.texts),
        "test_fraction": hp.probe_test_fraction,
        "seed": hp.seed,
        "rtp_probe_documents": other.description,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
        "versions": package_versions(),
        "command": (
            f"python benchmarks/probe_methods.py --model {args.model} --hparams {args.hparams} --layer {layer} "
            f"--threads {args.threads}"
        ),
    }
    write_json(args.out, report)
    for row in rows:
        print(
            f"{row['pooling']:16s} {row['method']:16s} held-out AUC {row['heldout_auc']:.4f}  "
            f"RTP docs AUC {row['rtp_probe_documents_auc']:.4f}  cos(mean diff) {row['cos_mean_difference']:+.3f}"
        )
    print(json.dumps({"seconds": report["seconds"]}))


if __name__ == "__main__":
    main()
