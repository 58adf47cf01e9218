"""The refusal direction of a chat model, layer by layer (core/refusal.py): candidates from harmful vs. harmless
*training* instructions at the last prompt token, scored on *validation* instructions by teacher forcing.

Data (``../shared/data/instructions``, andyrdt/refusal_direction's splits; none of it is AdvBench [0, 200),
which the project reports, tunes and validates on): candidates from harmful_train (210) and as many harmless_train
instructions (seeded sample); scores on harmful_val (39, HarmBench) and the first ``--harmless-val`` of
harmless_val. Writes JSON and a plot: per layer, the refusal log-odds shift from adding the candidate, and the KL
on harmless instructions from ablating it.

    OMP_NUM_THREADS=1 python benchmarks/refusal_direction.py --model smollm2-135m \\
        --out benchmarks/results/refusal_direction_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from surgery_plugin.core import architectures
from surgery_plugin.core.features import pooled_states
from surgery_plugin.core.provenance import package_versions
from surgery_plugin.core.refusal import eligible_layers, mean_differences, refusal_token_ids, score_candidates
from surgery_plugin.data.loaders import load_instructions
from surgery_plugin.evaluation.generation import format_prompts, next_token_logprobs
from surgery_plugin.io.files import write_json
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import instruction_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--harmless-val", type=int, default=100)
    parser.add_argument("--skip-last", type=float, default=0.2, help="share of the last layers not eligible")
    parser.add_argument("--max-kl", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/refusal_direction_smollm2.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tok = load_model(args.model)
    train = instruction_data(tok, args.data_dir, seed=args.seed)  # the probe data `instructions`, chat-formatted
    harmful = [t for t, label in zip(train.texts, train.labels, strict=True) if label == 1]
    harmless = [t for t, label in zip(train.texts, train.labels, strict=True) if label == 0]
    harmful_val, used_chat = format_prompts(tok, load_instructions(args.data_dir, "harmful_val"))
    harmless_val, _ = format_prompts(tok, load_instructions(args.data_dir, "harmless_val")[: args.harmless_val])
    layers = eligible_layers(len(architectures.decoder_layers(model)), args.skip_last)
    states = {}
    for name, texts in (("harmful", harmful), ("harmless", harmless)):
        states[name], _ = pooled_states(model, tok, texts, layers, (), pooling="last", batch_size=16, max_length=256)
    directions = mean_differences(states["harmful"], states["harmless"])

    def next_logprobs(prompts):
        return next_token_logprobs(model, tok, prompts, batch_size=16, progress=False)

    result = score_candidates(
        model, next_logprobs, directions, harmful_val, harmless_val, refusal_token_ids(tok), args.max_kl
    )
    report = {
        "model": args.model,
        "chat_template": used_chat,
        "data": {
            "candidates": f"instructions/harmful_train ({len(harmful)}) vs harmless_train (seeded sample of "
            f"{len(harmless)}, seed {args.seed}), last prompt token",
            "scores": f"instructions/harmful_val ({len(harmful_val)}), harmless_val[0:{len(harmless_val)}]",
        },
        "refusal_token_ids": refusal_token_ids(tok),
        "refusal_tokens": [tok.decode([i]) for i in refusal_token_ids(tok)],
        "skip_last": args.skip_last,
        **result,
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
        "versions": package_versions(),
        "command": (
            f"python benchmarks/refusal_direction.py --model {args.model} --harmless-val {args.harmless_val} "
            f"--skip-last {args.skip_last} --max-kl {args.max_kl} --seed {args.seed} --threads {args.threads}"
        ),
    }
    write_json(args.out, report)
    plot(report, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("base_refusal_log_odds", "chosen_layer", "seconds")}))


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgery_plugin.evaluation.report import save_figure

    rows = report["candidates"]
    layers = sorted(int(k) for k in rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.errorbar(
        layers,
        [rows[str(layer)]["induce"] for layer in layers],
        yerr=[1.96 * rows[str(layer)]["induce_se"] for layer in layers],
        marker="o",
        ms=3,
        capsize=2,
    )
    left.axhline(0, color="black", lw=0.5)
    left.set_title("refusal log-odds shift on harmful val, candidate added (95% CI)", fontsize=9)
    right.plot(layers, [rows[str(layer)]["kl_ablation"] for layer in layers], marker="o", ms=3, color="#555")
    right.axhline(report["max_kl"], color="#c0392b", lw=0.8, ls="--", label=f"max KL {report['max_kl']}")
    right.set_yscale("log")
    right.set_title("first-token KL on harmless val, candidate ablated", fontsize=9)
    right.legend(fontsize=8)
    if report["chosen_layer"] is not None:
        for ax in (left, right):
            ax.axvline(report["chosen_layer"], color="#2a7ab9", lw=0.8, ls=":")
    for ax in (left, right):
        ax.set_xlabel("layer (candidate at its input)")
    chosen = (
        f"chosen: layer {report['chosen_layer']}"
        if report["chosen_layer"] is not None
        else f"none chosen: no eligible candidate has KL <= {report['max_kl']}"
    )
    fig.suptitle(f"{report['model']}: refusal direction candidates ({chosen})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, png.parent, png.name)
    plt.close(fig)


if __name__ == "__main__":
    main()
