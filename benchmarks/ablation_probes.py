"""Directional ablation in the weights (compare's ``ablation`` row, the abliteration recipe) with different probes
of one model: what the probe recipe does to the ablated model's perplexity.

Gemma 3 270M's first comparison (``compare_gemma3_free``) found the weight ablation breaking the model (perplexity
x41,000); it used the probe then shipped (Davidson tweets, difference of means, mean pooling over every token).
This builds each probe on the model, projects its direction out of every attention output and MLP down projection
(``core.steering.apply_ablation``), and measures the token perplexity of the benign report prompts [0, 200) and the
largest next-token log-prob change on the first 4 of them, then restores the weights. Writes
``benchmarks/results/NAME.json``.

    python benchmarks/ablation_probes.py --model gemma3-270m --name ablation_probes_gemma3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from surgery_plugin.config import SurgeryHyperParams, find_hparams
from surgery_plugin.core.edit import revert_edit
from surgery_plugin.core.provenance import package_versions, utc_now
from surgery_plugin.core.steering import apply_ablation
from surgery_plugin.data.loaders import load_benign_documents
from surgery_plugin.data.paths import resolve_data_dir
from surgery_plugin.evaluation.generation import next_token_logprobs, perplexity
from surgery_plugin.io.files import write_json
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import build_probe

RESULTS = Path(__file__).resolve().parent / "results"
# the probe of the first Gemma comparison (its compare.json), and the one recipe change that isolates pooling
PROBES = {
    "first comparison's probe (davidson, mean_difference, mean pooling)": {},
    "the same with the first token left out of the pooling": {"pooling": "mean_drop_first"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--first-run", default=str(RESULTS / "compare_gemma3_free.json"))
    parser.add_argument("--name", default="ablation_probes_gemma3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_dir = resolve_data_dir(None)
    model, tok = load_model(args.model)
    first = json.loads(Path(args.first_run).read_text())["settings"]["surgery_hparams"]
    recipes = {
        name: SurgeryHyperParams.from_dict({**first, **change}, args.first_run) for name, change in PROBES.items()
    }
    recipes["shipped probe today"] = SurgeryHyperParams.from_hparams(find_hparams(args.model, "Surgery", None))
    prompts = [d["prompt"] for d in load_benign_documents(data_dir, limit=200, start=0)]
    base = next_token_logprobs(model, tok, prompts[:4], progress=False)
    result = {
        "model": args.model,
        "prompts": "rtp/nontoxic.jsonl prompts, non-challenging [0:200] (the benign report split)",
        "unedited_perplexity": perplexity(model, tok, prompts, progress=False)["token_perplexity"],
        "probes": {},
        "torch_threads": 1,
        "created": utc_now(),
        "versions": package_versions(),
    }
    for name, hp in recipes.items():
        probe, _ = build_probe(model, tok, hp, data_dir=data_dir, progress=False)
        originals = apply_ablation(model, probe.direction)
        try:
            after = next_token_logprobs(model, tok, prompts[:4], progress=False)
            result["probes"][name] = {
                "recipe": {k: hp.to_dict()[k] for k in ("probe_data", "probe_method", "pooling", "probe_layer")},
                "perplexity": perplexity(model, tok, prompts, progress=False)["token_perplexity"],
                "max_abs_logprob_change": float((after - base).abs().max()),
            }
        finally:
            revert_edit(model, originals)
        print(name, result["probes"][name], flush=True)
    write_json(RESULTS / f"{args.name}.json", result)


if __name__ == "__main__":
    main()
