"""Does the likelihood objective rank edits as the sampled protocol does? (issue 20, item 4)

N edits drawn at random from `surgery tune`'s default space (Optuna's RandomSampler, seeded: points no search
chose) are each measured on the same RTP validation prompts four ways:

- likelihood: the unedited model's K_base coupled samples per prompt, judged once, re-weighted per edit by one
  teacher-forced pass (core.importance.self_normalised_rate): the edited model's estimated toxic share;
- sampled (the reference): K coupled nucleus samples of the edited model itself per prompt, judged: its
  sample toxic rate, and its expected maximum toxicity;
- greedy: the toxic rate of one greedy continuation per prompt (what the searches optimised before);
- judge-free: the per-token log-likelihood shift of the records' human continuations, toxic minus non-toxic.

Reports Spearman's rho of each with the sampled toxic rate over the edits, with a bootstrap interval over
edits, the seconds each took, and a scatter plot.

    python benchmarks/objective_agreement.py --edits 12 --prompts 50 --base-samples 4 --samples 10 \\
        --out benchmarks/results/objective_agreement_smollm2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgery_plugin.commands.tune.space import Shape, default_space, point_hparams, sample  # noqa: E402
from surgery_plugin.config import SurgeryHyperParams  # noqa: E402
from surgery_plugin.core import architectures  # noqa: E402
from surgery_plugin.core.provenance import package_versions  # noqa: E402
from surgery_plugin.core.statistics import bootstrap_spearman  # noqa: E402
from surgery_plugin.errors import InfeasibleEdit  # noqa: E402
from surgery_plugin.evaluation.judges import load_judges  # noqa: E402
from surgery_plugin.evaluation.likelihood import (  # noqa: E402
    HumanContinuationObjective,
    ImportanceObjective,
    sample_base,
)
from surgery_plugin.evaluation.protocols import settings_for  # noqa: E402
from surgery_plugin.evaluation.runner import evaluate  # noqa: E402
from surgery_plugin.io.adapter import export_adapter, load_edited  # noqa: E402
from surgery_plugin.io.files import write_json  # noqa: E402
from surgery_plugin.models import load_model  # noqa: E402
from surgery_plugin.pipeline import EditCache, build_edit  # noqa: E402


def _timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hparams", default=str(REPO / "hparams" / "Surgery" / "smollm2-135m.yaml"))
    parser.add_argument("--edits", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=50, help="RTP validation prompts, from its start")
    parser.add_argument("--base-samples", type=int, default=4)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--judges", default="minilm:perspective,profanity")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "objective_agreement_smollm2.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model, tok = load_model(args.model)
    judges = load_judges(args.judges, progress=False, data_dir=args.data_dir)
    judge = judges[0].name
    settings = settings_for("rtp", "validation", judges, args.data_dir, limit=args.prompts, progress=False)
    base_hp = SurgeryHyperParams.from_hparams(args.hparams)
    shape = Shape(len(architectures.decoder_layers(model)), architectures.num_gate_rows(model))
    # the default space at the shipped probe layer and data (new probe data would cost a feature pass each)
    space = default_space(shape.n_layers, ("davidson",))
    space["probe_layer"] = {"choices": [base_hp.probe_layer]}
    base_samples, t_base = _timed(sample_base, model, tok, "rtp", settings, args.base_samples)
    importance = ImportanceObjective(model, tok, base_samples, settings.batch_size, progress=False)
    human = HumanContinuationObjective(model, tok, settings)
    cache = EditCache(hidden_hint=space["probe_layer"]["choices"], all_gate_layers=True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    rows, peft_model = [], None
    work = tempfile.TemporaryDirectory(prefix="agreement-")
    while len(rows) < args.edits:
        trial = study.ask()
        params = sample(trial, space, base_hp, shape)
        hp = point_hparams(params, base_hp, shape)
        try:
            with peft_model.disable_adapter() if peft_model is not None else _nothing():
                edit = build_edit(model, tok, hp, cache=cache, data_dir=args.data_dir, progress=False).edit
        except InfeasibleEdit:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, 0.0)
        name = f"edit{len(rows)}"
        folder = export_adapter(edit, model, Path(work.name) / name, base_model_name=args.model)
        peft_model = load_edited(peft_model or model, folder, adapter_name=name)
        peft_model.set_adapter(name)
        estimate, t_likelihood = _timed(importance.measure, peft_model)
        shift, t_human = _timed(human.measure, peft_model)
        sampled_settings = dataclasses.replace(settings, samples=args.samples)
        (results, _), t_sampled = _timed(evaluate, peft_model, tok, ["rtp"], sampled_settings)
        rtp = results["suites"]["rtp"]
        by_judge = rtp["sampling"]["by_judge"][judge]
        rows.append(
            {
                "edit": name,
                "params": params,
                "likelihood": estimate.estimate,
                "likelihood_se": estimate.se,
                "effective_samples": estimate.effective_samples,
                "human_shift": shift["shift"],
                "sampled_rate": by_judge["sample_toxic_rate"],
                "expected_max_toxicity": by_judge["expected_max_toxicity"],
                "greedy_rate": rtp["by_judge"][judge]["toxic_rate"],
                "seconds": {"likelihood": t_likelihood, "human": t_human, "sampled_and_greedy": t_sampled},
            }
        )
        print(
            f"{name}: likelihood {estimate.estimate:.3f} sampled {by_judge['sample_toxic_rate']:.3f} "
            f"greedy {rows[-1]['greedy_rate']:.3f} human {shift['shift']:+.4f}",
            flush=True,
        )
        # kept: PEFT cannot switch every adapter off once the active one is deleted (a dozen rank-1 adapters is small)
    reference = [r["sampled_rate"] for r in rows]
    agreement = {}
    for key in ("likelihood", "greedy_rate", "human_shift", "expected_max_toxicity"):
        rho, low, high = bootstrap_spearman([r[key] for r in rows], reference, n_boot=2000, seed=0)
        agreement[key] = {"spearman": rho, "ci95": [low, high]}
    result = {
        "what": __doc__.split("\n")[0],
        "command": " ".join(sys.argv),
        "model": args.model,
        "judge": judge,
        "prompts": f"rtp/toxic.jsonl[{settings.start}:{settings.start + args.prompts}] (validation split)",
        "base_samples": args.base_samples,
        "samples": args.samples,
        "seed": args.seed,
        "base_sampling_seconds": t_base,
        "base_rate": float(base_samples.flagged.nanmean()),
        "edits": rows,
        "agreement_with_sampled_rate": agreement,
        "versions": package_versions(("torch", "transformers", "peft", "optuna")),
    }
    write_json(Path(args.out), result)
    _plot(result, Path(args.out).with_suffix(".png"))
    print({k: (round(v["spearman"], 3), [round(x, 3) for x in v["ci95"]]) for k, v in agreement.items()})


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["edits"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    x = [r["sampled_rate"] for r in rows]
    for ax, key, label in zip(
        axes,
        ("likelihood", "greedy_rate", "human_shift"),
        ("likelihood (importance estimate)", "greedy toxic rate", "judge-free log-lik. shift"),
        strict=True,
    ):
        y = [r[key] for r in rows]
        errors = [1.96 * r["likelihood_se"] for r in rows] if key == "likelihood" else None
        ax.errorbar(x, y, yerr=errors, fmt="o", ms=5, alpha=0.8)
        a = result["agreement_with_sampled_rate"][key]
        ax.set_title(f"{label}\nSpearman {a['spearman']:.2f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]", fontsize=9)
        ax.set_xlabel(f"sampled toxic rate ({result['samples']} samples/prompt)")
    fig.suptitle(
        f"{len(rows)} random edits of {result['model']}, {result['prompts']}, judge {result['judge']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    if not math.isfinite(result["base_rate"]):
        raise SystemExit("no scored base sample")


if __name__ == "__main__":
    main()
