"""Speed of the RTP evaluation on SmolLM2-135M-Instruct: generation + judging, batched vs. batch size 1.

Runs the ``rtp`` suite's two steps on the same N challenging prompts (greedy, 20 new tokens):
generation with batch size 16 (left padding, length-sorted) and with batch size 1 (the same-run
baseline), then each judge on the 16-batch continuations (judges batch internally). Reports
seconds, prompts/s and the batch-16 / batch-1 speed-up, and checks both generations agree.

    OMP_NUM_THREADS=1 python benchmarks/eval_speed.py --n 200 --out benchmarks/results/eval_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgery_plugin.data.loaders import load_rtp
from surgery_plugin.evaluation.generation import generate_continuations  # noqa: E402
from surgery_plugin.evaluation.judges import load_judge
from surgery_plugin.io.files import atomic_write
from surgery_plugin.models import load_model  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="RTP challenging prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--judges", default="profanity,minilm")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_speed.json"))
    args = parser.parse_args()

    prompts = [r["prompt"]["text"] for r in load_rtp(args.data_dir, "toxic")[: args.n]]
    model, tok = load_model("smollm2-135m")
    judges = [
        load_judge(s, progress=False, data_dir=args.data_dir) for s in args.judges.split(",")
    ]  # load (and train) outside the timing
    generate_continuations(
        model, tok, prompts[:2], 2, 2, progress=False
    )  # warm-up: first-call allocations are not the steady state

    batched, t_batched = _timed(
        lambda: generate_continuations(model, tok, prompts, args.max_new_tokens, args.batch_size, progress=False)
    )
    single, t_single = _timed(
        lambda: generate_continuations(model, tok, prompts, args.max_new_tokens, 1, progress=False)
    )
    judge_times = {}
    for judge in judges:
        _, seconds = _timed(lambda judge=judge: judge.score(batched))
        judge_times[judge.name] = seconds
    same = sum(a == b for a, b in zip(batched, single, strict=True))
    total = t_batched + sum(judge_times.values())
    result = {
        "task": f"RTP challenging prompts, n={len(prompts)}, greedy, {args.max_new_tokens} new tokens, "
        "SmolLM2-135M-Instruct fp32",
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
        f"python benchmarks/eval_speed.py --n {args.n}",
        "generation": {
            f"batch_{args.batch_size}": {
                "seconds": round(t_batched, 2),
                "prompts_per_s": round(len(prompts) / t_batched, 2),
            },
            "batch_1": {"seconds": round(t_single, 2), "prompts_per_s": round(len(prompts) / t_single, 2)},
            "speedup_batched_vs_1": round(t_single / t_batched, 2),
            "identical_continuations": f"{same}/{len(prompts)}",
        },
        "judging": {
            name: {"seconds": round(s, 2), "texts_per_s": round(len(batched) / s, 1)}
            for name, s in judge_times.items()
        },
        "total_batched": {
            "seconds": round(total, 2),
            "prompts_per_s": round(len(prompts) / total, 2),
            "what": f"generation (batch {args.batch_size}) + all judges",
        },
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cores_visible": os.cpu_count(),
        },
    }
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
