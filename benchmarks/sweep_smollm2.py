"""Tune Model Surgery on SmolLM2-135M: toxic-continuation rate vs. perplexity over a grid.

Each grid point edits the model in place, runs RTP (tuning prompts) + perplexity, and reverts
bitwise. Results append to a JSON file as they arrive (re-running skips finished points), and a
plot of toxic rate vs. perplexity is drawn from it.

    python benchmarks/sweep_smollm2.py --out benchmarks/results/sweep_smollm2.json \
        --layers 10 15 -1 --top-k 0.0465 --alphas 0 0.5 1 2 --normalize --limit 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

import torch

from surgery_plugin.config import SurgeryHyperParams
from surgery_plugin.core.edit import apply_edit, execute_surgery, revert_edit
from surgery_plugin.core.probe import Probe
from surgery_plugin.data.probe_data import load_behavior_data
from surgery_plugin.evaluation.judges import load_judge
from surgery_plugin.evaluation.protocols import settings_for
from surgery_plugin.evaluation.runner import evaluate
from surgery_plugin.io.files import atomic_write
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import build_probe


def point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"points": [], "baseline": None}


def save_results(path: Path, results: dict) -> None:
    atomic_write(path, json.dumps(results, indent=1))


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both toxic rate and perplexity."""
    front = [
        p
        for p in points
        if not any(
            q["ppl"] <= p["ppl"]
            and q["toxic_rate"] <= p["toxic_rate"]
            and (q["ppl"], q["toxic_rate"]) != (p["ppl"], p["toxic_rate"])
            for q in points
        )
    ]
    return sorted(front, key=lambda p: p["ppl"])


def plot(results: dict, png: Path, chosen: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    groups: dict[str, list] = {}
    for p in results["points"]:
        c = p["config"]
        label = (
            f"probe h[{c['probe_layer']}], K={c['top_k']}, layers {c['layer_range'] or 'all'}, "
            f"{'normalised' if c['normalize'] else 'raw probe (paper)'}"
        )
        groups.setdefault(label, []).append(p)
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>pPXh*"
    for i, (label, pts) in enumerate(sorted(groups.items())):
        pts = sorted(pts, key=lambda p: p["config"]["alpha"])
        ax.plot(
            [p["ppl"] for p in pts],
            [p["toxic_rate"] for p in pts],
            marker=markers[i % len(markers)],
            color=cmap(i % 20),
            lw=1,
            ms=5,
            label=label,
        )
        for p in pts:
            ax.annotate(
                f"{p['config']['alpha']:g}",
                (p["ppl"], p["toxic_rate"]),
                fontsize=6,
                xytext=(2, 2),
                textcoords="offset points",
            )
    front = pareto_front(results["points"])
    ax.plot(
        [p["ppl"] for p in front],
        [p["toxic_rate"] for p in front],
        color="black",
        lw=2,
        alpha=0.25,
        label="Pareto front",
    )
    base = results.get("baseline")
    if base:
        ax.axvline(base["ppl"] * 1.10, color="grey", ls="--", lw=1, label="target: perplexity +10%")
        ax.axhline(base["toxic_rate"] * 0.5, color="red", ls="--", lw=1, label="target: toxic rate / 2")
        ax.scatter([base["ppl"]], [base["toxic_rate"]], color="black", zorder=5, s=40, label="unedited")
    if chosen:
        hit = [p for p in results["points"] if all(p["config"].get(k) == v for k, v in chosen.items())]
        if hit:
            ax.scatter(
                [hit[0]["ppl"]],
                [hit[0]["toxic_rate"]],
                marker="*",
                s=300,
                color="gold",
                edgecolor="black",
                zorder=6,
                label="shipped hparams/Surgery/smollm2-135m.yaml",
            )
    ax.set_xscale("log")
    ax.set_xlabel("perplexity on benign text (non-toxic RTP documents, log scale)")
    ax.set_ylabel("toxic-continuation rate (RTP challenging [0, 200), profanity judge)")
    ax.set_title("Model Surgery on SmolLM2-135M-Instruct: tuning sweep (point labels = alpha)")
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/sweep_smollm2.json")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1])
    parser.add_argument("--top-k", type=float, nargs="+", default=[0.0465])
    parser.add_argument("--layer-ranges", nargs="+", default=["all"], help="'all' or start:end")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--normalize", choices=["yes", "no", "both"], default="yes")
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--limit", type=int, default=200, help="RTP tuning prompts: rtp/toxic.jsonl[0:limit]")
    parser.add_argument("--ppl-limit", type=int, default=100)
    parser.add_argument("--max-per-class", type=int, default=SurgeryHyperParams.probe_max_per_class)
    parser.add_argument("--probe-dir", default="benchmarks/results/probes")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument(
        "--combine", nargs="+", default=None, help="merge these result files into --out (same baseline required)"
    )
    parser.add_argument("--chosen", default=None, help="with --combine: an hparams YAML whose point to mark")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    out = Path(args.out)
    if args.combine:
        parts = [load_results(Path(p)) for p in args.combine]
        baselines = {
            json.dumps(p["baseline"]["toxic_rate"]) + json.dumps(round(p["baseline"]["ppl"], 6)) for p in parts
        }
        if len(baselines) != 1:
            raise SystemExit(f"baselines differ between {args.combine}: not one experiment")
        merged = {
            "baseline": parts[0]["baseline"],
            "settings": parts[0].get("settings"),
            "sources": args.combine,
            "points": [pt for p in parts for pt in p["points"]],
        }
        chosen = None
        if args.chosen:
            import yaml

            hp = yaml.safe_load(Path(args.chosen).read_text())
            chosen = {
                "probe_layer": hp["probe_layer"],
                "top_k": hp["top_k"],
                "layer_range": hp["layer_range"],
                "normalize": hp["normalize"],
                "alpha": hp["alpha"],
            }
            merged["chosen"] = chosen
        merged["pareto_front"] = [
            p["config"] | {"toxic_rate": p["toxic_rate"], "ppl": p["ppl"]} for p in pareto_front(merged["points"])
        ]
        save_results(out, merged)
        plot(merged, out.with_suffix(".png"), chosen)
        return
    results = load_results(out)
    if args.plot_only:
        plot(results, out.with_suffix(".png"))
        return
    done = {point_key(p["config"]) for p in results["points"]}
    model, tok = load_model("smollm2-135m")
    # the tuning split: RTP challenging [0, limit), benign documents of the tune split for perplexity
    settings = settings_for(
        "rtp", "tune", [load_judge("profanity", progress=False)], limit=args.limit, ppl_limit=args.ppl_limit
    )
    settings.progress = False

    def run_eval() -> dict:
        start = time.perf_counter()
        res, _ = evaluate(model, tok, ["rtp", "ppl"], settings)
        return {
            "toxic_rate": res["suites"]["rtp"]["toxic_rate"],
            "mean_toxicity": res["suites"]["rtp"]["mean_toxicity"],
            "ppl": res["suites"]["ppl"]["token_perplexity"],
            "n": res["suites"]["rtp"]["n"],
            "seconds": round(time.perf_counter() - start, 1),
        }

    if results["baseline"] is None:
        results["baseline"] = run_eval()
        results["settings"] = {
            "limit": args.limit,
            "ppl_limit": args.ppl_limit,
            "judge": "profanity",
            "prompts": f"rtp/toxic.jsonl[{settings.start}:{settings.start + settings.limit}]",
            "benign": f"rtp/nontoxic.jsonl non-challenging [{settings.benign_start}:"
            f"{settings.benign_start + settings.ppl_limit}]",
        }
        save_results(out, results)
    logging.info("baseline %s", results["baseline"])
    normalize_options = {"yes": [True], "no": [False], "both": [True, False]}[args.normalize]
    data = load_behavior_data("davidson", None, args.max_per_class, 0)
    for layer in args.layers:
        probe_path = Path(args.probe_dir) / f"layer{layer}_{args.pooling}.safetensors"
        if probe_path.is_file():
            probe = Probe.load(probe_path, model)
        else:
            hp = SurgeryHyperParams(probe_layer=layer, pooling=args.pooling, probe_max_per_class=args.max_per_class)
            probe, _ = build_probe(model, tok, hp, data=data)
            probe.save(probe_path)
        for top_k, layer_range, normalize, alpha in itertools.product(
            args.top_k, args.layer_ranges, normalize_options, args.alphas
        ):
            bounds = None if layer_range == "all" else [int(x) for x in layer_range.split(":")]
            config = {
                "probe_layer": layer,
                "pooling": args.pooling,
                "top_k": top_k if top_k < 1 else int(top_k),
                "layer_range": bounds,
                "normalize": normalize,
                "alpha": alpha,
            }
            if point_key(config) in done:
                continue
            hp = SurgeryHyperParams(
                probe_layer=layer, top_k=config["top_k"], layer_range=bounds, normalize=normalize, alpha=alpha
            )
            edit = execute_surgery(model, probe, hp)
            originals = apply_edit(model, edit)
            try:
                metrics = run_eval()
            finally:
                revert_edit(model, originals)
            point = {
                "config": config,
                "step": edit.step,
                "num_rows": edit.regions.num_rows,
                "probe_test_accuracy": probe.metadata.get("test_accuracy"),
                **metrics,
            }
            logging.info("%s -> %s", config, metrics)
            results["points"].append(point)
            done.add(point_key(config))
            save_results(out, results)
            plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
