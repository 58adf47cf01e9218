"""Speed of the sampled protocol (coupled nucleus sampling, k samples per prompt) against greedy batched
generation of the same number of sequences and tokens, on SmolLM2-135M-Instruct, in one process.

The first two runs generate N x k continuations of 20 tokens of RTP challenging prompts (validation split) with the
same batch size (rows per forward pass): the sampled run with ``--samples k`` semantics (each batch holds
batch_size // k prompts times their k samples, every row its own noise stream), the greedy run the same
prompts repeated k times. A third run samples with the nucleus found by a full sort of the vocabulary
(``nucleus_mask`` with no heads, the sampler's former algorithm): its time, and the share of samples that
came out identical, show what the sorted-heads shortcut saves and that it draws the same samples.
Judging (every judge of the toxicity behavior) is timed on the sampled texts.

    python benchmarks/sampled_speed.py --prompts 20 --samples 25 --out benchmarks/results/sampled_speed.json
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgery_plugin.behaviors import get_behavior  # noqa: E402
from surgery_plugin.core.provenance import package_versions  # noqa: E402
from surgery_plugin.data.splits import RTP_CHALLENGING  # noqa: E402
from surgery_plugin.evaluation import generation  # noqa: E402
from surgery_plugin.evaluation.generation import generate_continuations  # noqa: E402
from surgery_plugin.evaluation.judges import load_judges  # noqa: E402
from surgery_plugin.evaluation.protocols import rtp_documents  # noqa: E402
from surgery_plugin.io.files import write_json  # noqa: E402
from surgery_plugin.models import load_model  # noqa: E402


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=25, help="rows per forward pass, both runs")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampled_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, _ = RTP_CHALLENGING["validation"]
    prompts = [d["prompt"] for d in rtp_documents(args.data_dir)[start : start + args.prompts]]
    model, tok = load_model("smollm2-135m")
    judges = load_judges(get_behavior("toxicity").judges, progress=False, data_dir=args.data_dir)
    generate_continuations(model, tok, prompts[:2], 2, 2, progress=False)  # warm-up
    common = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    sampled, t_sampled = _timed(
        generate_continuations, model, tok, prompts, num_samples=args.samples, seed=0, top_p=0.9, **common
    )
    heads_mask = generation.nucleus_mask
    generation.nucleus_mask = functools.partial(heads_mask, heads=())
    try:
        full_sort, t_full_sort = _timed(
            generate_continuations, model, tok, prompts, num_samples=args.samples, seed=0, top_p=0.9, **common
        )
    finally:
        generation.nucleus_mask = heads_mask
    repeated = [p for p in prompts for _ in range(args.samples)]
    _, t_greedy = _timed(generate_continuations, model, tok, repeated, **common)
    texts = [t for per_prompt in sampled for t in per_prompt]
    judge_seconds = {}
    for judge in judges:
        _, judge_seconds[judge.name] = _timed(judge.score, texts)
    n = len(texts)
    result = {
        "what": __doc__.split("\n")[0],
        "command": " ".join(sys.argv),
        "prompts": f"rtp/toxic.jsonl[{start}:{start + args.prompts}]",
        "samples_per_prompt": args.samples,
        "sequences": n,
        "max_new_tokens": args.max_new_tokens,
        "batch_size_rows": args.batch_size,
        "torch_threads": args.threads,
        "sampled_seconds": t_sampled,
        "greedy_same_rows_seconds": t_greedy,
        "sampled_over_greedy": t_sampled / t_greedy,
        "full_sort_sampled_seconds": t_full_sort,
        "full_sort_over_sampled": t_full_sort / t_sampled,
        "samples_identical_to_full_sort": sum(
            a == b for x, y in zip(sampled, full_sort, strict=True) for a, b in zip(x, y, strict=True)
        )
        / n,
        "sampled_sequences_per_second": n / t_sampled,
        "judge_seconds": judge_seconds,
        "projected_minutes_k25_100_prompts_one_arm": (t_sampled + sum(judge_seconds.values())) / n * 2500 / 60,
        "machine": {"processor": platform.processor(), "cpus": torch.get_num_threads()},
        "versions": package_versions(("torch", "transformers")),
    }
    write_json(Path(args.out), result)
    print({k: v for k, v in result.items() if k not in ("versions", "machine")})


if __name__ == "__main__":
    main()
