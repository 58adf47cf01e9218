"""Probe feature extraction speed: ``hidden_features`` against the plain batched forward pass (the floor)
and against one-text-at-a-time loops, on the same texts, in the same run.

- ``hidden_features``: the package's function on the model loaded up to the probe layer
  (``load_model(..., probe_layer=L)``: embeddings + layers < L), Davidson tweets, batch 16,
  length-sorted, max_length 256; and the same on the whole model (it stops at the layer too);
- floor: the same batches (tokenized and padded beforehand, outside the timing) through the
  loaded layers: ``model.model(input_ids, attention_mask)``, nothing else;
- one at a time: ``hidden_features(..., batch_size=1)`` on the prefix, and the common recipe
  ``model(**tok(text), output_hidden_states=True).hidden_states[L].mean(1)`` on the whole model,
  over the first ``--single-n`` texts.

Throughput is real (non-padding) tokens per second. The features of every variant are compared
with the package's (max abs difference).

    OMP_NUM_THREADS=1 python benchmarks/probe_features.py --model smollm2-135m --layer 10 \\
        --out benchmarks/results/probe_features_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgery_plugin.core import architectures
from surgery_plugin.core.batching import length_sorted_batches, pad
from surgery_plugin.core.features import hidden_features
from surgery_plugin.data.loaders import load_davidson
from surgery_plugin.io.files import atomic_write
from surgery_plugin.models import load_model  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@torch.no_grad()
def floor_forward(model, encoded: list[list[int]], batch_size: int) -> None:
    """The same length-sorted, right-padded batches through the loaded layers, prepared before timing."""
    batches = [
        pad([encoded[i] for i in batch], 0, "right")
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size, progress=False)
    ]
    transformer = architectures.base_transformer(model)
    start = time.perf_counter()
    for input_ids, mask in batches:
        transformer(input_ids=input_ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def one_at_a_time_full(model, tok, texts, layer: int, max_length: int) -> torch.Tensor:
    """The common recipe: the whole model, all hidden states, one text per call."""
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)
        if ids["input_ids"].shape[1] == 0:
            ids = {
                "input_ids": torch.tensor([[tok.eos_token_id]]),
                "attention_mask": torch.ones(1, 1, dtype=torch.long),
            }
        out.append(model(**ids, output_hidden_states=True).hidden_states[layer].float().mean(1)[0])
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m", help="alias or HF folder")
    parser.add_argument("--name", default=None, help="the model's name in the JSON (default: --model)")
    parser.add_argument("--layer", type=int, default=10, help="hidden-state index (the probe layer)")
    parser.add_argument("--n", type=int, default=512, help="Davidson tweets (half toxic)")
    parser.add_argument("--single-n", type=int, default=96, help="texts for the one-at-a-time loops")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "probe_features_smollm2.json"))
    args = parser.parse_args()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    texts = load_davidson(args.data_dir, max_per_class=args.n // 2, seed=0).texts
    prefix, tok = load_model(args.model, probe_layer=args.layer)
    whole, _ = load_model(args.model)
    encoded = [tok(t, truncation=True, max_length=args.max_length)["input_ids"] or [tok.eos_token_id] for t in texts]
    tokens, single_tokens = sum(map(len, encoded)), sum(map(len, encoded[: args.single_n]))
    single = texts[: args.single_n]

    def features(model, batch_size, subset=texts):
        return hidden_features(model, tok, subset, args.layer, "mean", batch_size, args.max_length, progress=False)

    features(prefix, args.batch_size, texts[:32])  # warm-up: first-call allocations are not the steady state
    floor_forward(prefix, encoded[:32], args.batch_size)
    batched, t_batched = _timed(lambda: features(prefix, args.batch_size))
    t_floor = floor_forward(prefix, encoded, args.batch_size)
    whole_batched, t_whole = _timed(lambda: features(whole, args.batch_size))
    one_prefix, t_one_prefix = _timed(lambda: features(prefix, 1, single))
    naive, t_naive = _timed(lambda: one_at_a_time_full(whole, tok, single, args.layer, args.max_length))

    def rate(n_tokens, seconds):
        return round(n_tokens / seconds, 1)

    def diff(a, b):
        return float((a - b).abs().max())

    layers_loaded = len(architectures.decoder_layers(prefix))
    result = {
        "model": args.name or args.model,
        "probe_layer": args.layer,
        "layers_loaded": f"{layers_loaded} of {architectures.full_num_layers(prefix)}",
        "params_loaded": {
            "prefix": sum(p.numel() for p in prefix.parameters()),
            "whole": sum(p.numel() for p in whole.parameters()),
        },
        "texts": len(texts),
        "real_tokens": tokens,
        "batch_size": args.batch_size,
        "tokens_per_s": {
            "hidden_features_prefix": rate(tokens, t_batched),
            "floor_batched_forward_prefix": rate(tokens, t_floor),
            "hidden_features_whole_model": rate(tokens, t_whole),
            "one_at_a_time_hidden_features_prefix": rate(single_tokens, t_one_prefix),
            "one_at_a_time_whole_model_all_hidden_states": rate(single_tokens, t_naive),
        },
        "seconds": {
            "hidden_features_prefix": round(t_batched, 2),
            "floor_batched_forward_prefix": round(t_floor, 2),
            "hidden_features_whole_model": round(t_whole, 2),
            f"one_at_a_time_hidden_features_prefix ({len(single)} texts)": round(t_one_prefix, 2),
            f"one_at_a_time_whole_model ({len(single)} texts)": round(t_naive, 2),
        },
        "ratios": {
            "hidden_features_over_floor": round(t_floor / t_batched, 3),
            "target_over_floor": ">= 0.7",
            "hidden_features_over_one_at_a_time_whole_model": round(
                (tokens / t_batched) / (single_tokens / t_naive), 2
            ),
            "hidden_features_over_one_at_a_time_prefix": round(
                (tokens / t_batched) / (single_tokens / t_one_prefix), 2
            ),
            "target_over_one_at_a_time": ">= 5",
        },
        "max_abs_feature_difference": {
            "prefix_vs_whole_model": diff(batched, whole_batched),
            "batched_vs_one_at_a_time_prefix": diff(batched[: len(single)], one_prefix),
            "batched_vs_common_recipe": diff(batched[: len(single)], naive),
        },
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/probe_features.py "
        f"--model {args.model} --layer {args.layer} --n {args.n}",
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
