"""Region selection (scores, running global top-K, mean row norm) against one pass over the gate weights.

The gates are in memory: SmolLM2-135M's (float32, as ``surgery edit`` loads it) and, with
``--checkpoint``, the 32 gate tensors of the synthetic LLaMA2-7B-shaped checkpoint
(``benchmarks/make_7b_checkpoint.py``), read once into memory in their bf16. The floor is one
pass that reads every gate weight once: ``tensor.amax()`` per layer, the fastest reduction over
bf16 here (``sum(dtype=float32)`` of bf16 takes 9x longer); both are timed in the same run, best
of ``--repeats``.

    OMP_NUM_THREADS=1 python benchmarks/region_selection.py --checkpoint /work/bench-7b \\
        --out benchmarks/results/region_selection.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgery_plugin.core.architectures import GateRows, ModelGates
from surgery_plugin.core.regions import SCORE_BLOCK_ROWS, scan_gates
from surgery_plugin.io.files import atomic_write


class LoadedGates(GateRows):
    """Gate tensors already in memory (read from a checkpoint), without the rest of the model."""

    def __init__(self, source: GateRows):
        self.name, self.model_type, self.spec = source.name, source.model_type, source.spec
        self.num_layers, self.rows_per_layer, self.hidden_size = (
            source.num_layers,
            source.rows_per_layer,
            source.hidden_size,
        )
        self.weights = [torch.cat(list(source.row_blocks(layer, 4096))) for layer in range(source.num_layers)]

    def row_blocks(self, layer: int, block_rows: int) -> Iterator[torch.Tensor]:
        rows = self.weights[layer]
        for start in range(0, rows.shape[0], block_rows):
            yield rows[start : start + block_rows]

    def entries(self, layer: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.weights[layer][rows, cols].float()


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(gates: GateRows, top_k, repeats: int) -> dict:
    direction = torch.randn(gates.hidden_size, generator=torch.Generator().manual_seed(0))

    def one_pass():
        with torch.no_grad():
            for layer in range(gates.num_layers):
                for block in gates.row_blocks(layer, 1 << 30):
                    block.amax()

    def select():
        scan_gates(gates, direction, top_k)

    one_pass()  # warm-up
    floor, selection = _best(one_pass, repeats), _best(select, repeats)
    dtype = next(gates.row_blocks(0, 1)).dtype
    gate_bytes = (
        gates.num_layers * gates.rows_per_layer * gates.hidden_size * torch.empty(0, dtype=dtype).element_size()
    )
    return {
        "layers": gates.num_layers,
        "gate_rows_per_layer": gates.rows_per_layer,
        "hidden": gates.hidden_size,
        "dtype": str(dtype).removeprefix("torch."),
        "gate_bytes": gate_bytes,
        "top_k": top_k,
        "selection_seconds": round(selection, 4),
        "one_pass_seconds": round(floor, 4),
        "ratio_selection_to_one_pass": round(selection / floor, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None, help="the 7B-shaped checkpoint (make_7b_checkpoint.py)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "region_selection.json"))
    args = parser.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    from surgery_plugin.models import load_model

    model, _ = load_model("smollm2-135m")
    result = {"smollm2_135m_fp32": measure(ModelGates(model), 0.0465, args.repeats)}
    del model
    if args.checkpoint:
        from surgery_plugin.core.streaming import CheckpointGates

        result["llama2_7b_shape_bf16"] = measure(LoadedGates(CheckpointGates(args.checkpoint)), 16384, args.repeats)
    result.update(
        {
            "what": f"scan_gates (scores -cos(g, v) in {SCORE_BLOCK_ROWS}-row float32 blocks, running global top-K, "
            "mean row norm) vs one pass over the same in-memory gate weights (amax per layer); best of the repeats",
            "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/region_selection.py"
            + (f" --checkpoint {args.checkpoint}" if args.checkpoint else ""),
            "threads": torch.get_num_threads(),
            "load_before": load,
            "load_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        }
    )
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
