"""Hand check of ToxiGen-probe edits, alone and stacked in place on the shipped toxicity edit (README, implicit hate).

Measured on the probe-side ToxiGen groups (TOXIGEN_PROBE_GROUPS, prompts [0, PER_GROUP) each), RTP tuning
prompts [0, 40) and benign documents [200, 240) only; prints one JSON line per stack. Each stack is a list
of changes to the shipped SmolLM2 YAML, one edit each, e.g.

    OMP_NUM_THREADS=1 python benchmarks/implicit_hate_check.py 10 \\
        '[["base", []], ["tox", [{}]], ["tox+tg0.3", [{}, {"probe_data": "toxigen", "alpha": 0.3}]]]'
"""

from __future__ import annotations

import json
import sys
import time

import torch

from surgery_plugin.config import SurgeryHyperParams
from surgery_plugin.core.edit import apply_edit, revert_edit
from surgery_plugin.data.splits import TOXIGEN_PROBE_GROUPS
from surgery_plugin.evaluation.judges import load_judges
from surgery_plugin.evaluation.protocols import settings_for
from surgery_plugin.evaluation.runner import evaluate
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import build_edit


def main() -> None:
    torch.set_num_threads(1)
    per_group, stacks = int(sys.argv[1]), json.loads(sys.argv[2])
    model, tok = load_model("smollm2-135m")
    judges = load_judges("profanity,minilm", progress=False)
    # the tuning splits: ToxiGen's probe-side groups from line 0, benign [200, 240), RTP [0, 40)
    toxigen = settings_for(
        "toxigen", "tune", judges, limit=per_group * len(TOXIGEN_PROBE_GROUPS), ppl_limit=40, progress=False
    )
    rtp = settings_for("rtp", "tune", judges, limit=40, progress=False)
    shipped = SurgeryHyperParams.from_hparams("hparams/Surgery/smollm2-135m.yaml")
    edits: dict = {}

    def edit_for(changes: dict):
        key = json.dumps(changes, sort_keys=True)
        if key not in edits:
            edits[key] = build_edit(model, tok, shipped.replace(**changes), progress=False).edit
        return edits[key]

    for tag, stack in stacks:
        started = time.perf_counter()
        originals = [apply_edit(model, edit_for(changes)) for changes in stack]
        try:
            tg = evaluate(model, tok, ["toxigen", "ppl"], toxigen)[0]["suites"]
            rt = evaluate(model, tok, ["rtp"], rtp)[0]["suites"]["rtp"]["by_judge"]
        finally:
            for weights in reversed(originals):
                revert_edit(model, weights)
        judged = tg["toxigen"]["by_judge"]
        print(
            json.dumps(
                {
                    "tag": tag,
                    "rtp": {j: rt[j]["toxic_rate"] for j in rt},
                    "toxigen": {j: judged[j]["toxic_rate"] for j in judged},
                    "ppl": round(tg["ppl"]["token_perplexity"], 2),
                    "seconds": round(time.perf_counter() - started),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
