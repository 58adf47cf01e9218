"""Fast exploration of the surgery design space with a teacher-forced proxy (no generation).

For each configuration: mean NLL of the toxic RTP continuations (continuation tokens only, given
their prompt) and mean NLL of benign text. A useful edit raises the first much more than the
second. Candidates found here are then measured for real (greedy generation + judge) by
``sweep_smollm2.py``; the proxy only narrows the search.

    python benchmarks/explore_proxy.py --layers 5 10 20 -1 --top-k 0.0465 0.2 --alphas 0.5 1 2 -1
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from surgery_plugin.data import load_behavior_data, load_benign_texts, load_rtp
from surgery_plugin.hparams import SurgeryHyperParams
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import make_probe, training_from_hparams
from surgery_plugin.probe import Probe
from surgery_plugin.surgery import apply_edit, execute_surgery, revert_edit


@torch.no_grad()
def continuation_nll(model, tok, pairs: list[tuple[str, str]], batch_size: int = 16) -> float:
    """Mean per-token NLL of each continuation given its prompt."""
    total, count = 0.0, 0
    encoded = []
    for prompt, cont in pairs:
        p = tok(prompt)["input_ids"]
        c = tok(cont)["input_ids"]
        encoded.append((p + c)[:128] if len(p + c) > 128 else p + c)
        encoded[-1] = (encoded[-1], len(p))
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        weight = torch.zeros(len(batch), width)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            weight[row, n_prompt : len(ids)] = 1
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        w = weight[:, 1:]
        total += float((nll * w).sum())
        count += int(w.sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/explore_proxy.json")
    parser.add_argument("--layers", type=int, nargs="+", default=[10])
    parser.add_argument("--top-k", type=float, nargs="+", default=[0.0465])
    parser.add_argument("--layer-ranges", nargs="+", default=["all"])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0])
    parser.add_argument("--normalize", choices=["yes", "no"], default="yes")
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--max-per-class", type=int, default=2000)
    parser.add_argument("--probe-dir", default="benchmarks/results/probes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"points": []}
    done = {json.dumps(p["config"], sort_keys=True) for p in results["points"]}
    model, tok = load_model("smollm2-135m")
    records = [r for r in load_rtp(None, "toxic") if (r["continuation"].get("toxicity") or 0) >= 0.5][: args.n]
    toxic_pairs = [(r["prompt"]["text"], r["continuation"]["text"]) for r in records]
    benign_pairs = [("", t) for t in load_benign_texts(None, limit=args.n)]
    benign_pairs = [(t[: len(t) // 3], t[len(t) // 3 :]) for _, t in benign_pairs]

    def measure() -> dict:
        return {"toxic_nll": continuation_nll(model, tok, toxic_pairs), "benign_nll": continuation_nll(model, tok, benign_pairs)}

    if "baseline" not in results:
        results["baseline"] = measure()
    base = results["baseline"]
    logging.info("baseline %s (n_toxic=%d)", base, len(toxic_pairs))
    data = load_behavior_data("davidson", None, args.max_per_class, 0)
    for layer in args.layers:
        probe_path = Path(args.probe_dir) / f"layer{layer}_mean.safetensors"
        if probe_path.is_file():
            probe = Probe.load(probe_path, model)
        else:
            hp = SurgeryHyperParams(probe_layer=layer, probe_max_per_class=args.max_per_class)
            probe, _ = make_probe(model, tok, data, layer, "mean", training_from_hparams(hp), hp.feature_batch_size, hp.max_length)
            probe.save(probe_path)
        for top_k, layer_range, alpha in itertools.product(args.top_k, args.layer_ranges, args.alphas):
            bounds = None if layer_range == "all" else [int(x) for x in layer_range.split(":")]
            config = {"probe_layer": layer, "top_k": top_k if top_k < 1 else int(top_k), "layer_range": bounds,
                      "normalize": args.normalize == "yes", "alpha": alpha}
            if json.dumps(config, sort_keys=True) in done:
                continue
            hp = SurgeryHyperParams(top_k=config["top_k"], layer_range=bounds, normalize=config["normalize"], alpha=alpha)
            edit = execute_surgery(model, probe, hp)
            originals = apply_edit(model, edit)
            try:
                m = measure()
            finally:
                revert_edit(model, originals)
            m["d_toxic"] = m["toxic_nll"] - base["toxic_nll"]
            m["d_benign"] = m["benign_nll"] - base["benign_nll"]
            results["points"].append({"config": config, **m})
            logging.info("%s -> d_toxic %+.4f d_benign %+.4f", config, m["d_toxic"], m["d_benign"])
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, out)


if __name__ == "__main__":
    main()
