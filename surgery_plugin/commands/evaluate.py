"""``surgery eval``: suites on a model (with an adapter or a stack, optionally at several alphas) -> RUN_DIR.

By default every suite runs on its *report* split (:mod:`surgery_plugin.data.splits`), the prompts no
probe, search or validation saw; ``start`` evaluates a range of the user's own instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..behaviors import Behavior
from ..errors import SurgeryError
from ..evaluation.arms import ArmStore, paired_run_identity
from ..evaluation.paired import comparison_rows, paired_changes, paired_table
from ..evaluation.protocols import PROTOCOLS, EvalSettings, plan
from ..evaluation.report import metric_values, write_paired_plot
from ..evaluation.runner import evaluate_plan, write_alpha_sweep, write_run, write_run_files
from ..io.adapter import set_alpha
from ..io.files import json_text, output, write_manifest


def eval_plan(
    suites: Sequence[str],
    judges: Sequence,
    data_dir=None,
    limit: int | None = None,
    ppl_limit: int | None = None,
    start: int | None = None,
    split: str = "report",
    benign_start: int = 0,
    toxigen_groups: tuple[str, ...] | None = None,
    **options: Any,
) -> dict[str, EvalSettings]:
    """Each suite's settings: its ``split`` (default: report), or (``start``) the range ``[start, start + limit)``.
    ``samples`` needs a suite with a sampled protocol (the others run greedy only)."""
    if options.get("sample_limit") is not None and not options.get("samples"):
        raise SurgeryError("--sample-limit limits the sampled protocol: pass --samples too")
    if options.get("samples") and not any(s in PROTOCOLS and PROTOCOLS[s].sampled for s in suites):
        sampled = ", ".join(name for name, p in PROTOCOLS.items() if p.sampled)
        raise SurgeryError(f"--samples: none of the suites {', '.join(suites)} has a sampled protocol ({sampled} do)")
    if start is None:
        return plan(suites, split, judges, data_dir, limit=limit, ppl_limit=ppl_limit, **options)
    custom = EvalSettings(
        judges=list(judges),
        limit=limit,
        start=start,
        ppl_limit=200 if ppl_limit is None else ppl_limit,
        benign_start=benign_start,
        toxigen_groups=toxigen_groups,
        data_dir=data_dir,
        **options,
    )
    return {suite: custom for suite in suites}


def headline(results: dict, behavior: Behavior | None) -> dict | None:
    """The behavior's headline number of each judge, when its suite ran."""
    if behavior is None or behavior.metric[0] not in results["suites"]:
        return None
    suite, key = behavior.metric
    values = metric_values(results["suites"][suite], PROTOCOLS[suite].metric(key))
    return {"suite": suite, "key": key, "values": {j: v for j, (v, _) in values.items()}}


def control_adapters(
    peft_model: nn.Module,
    edit,
    base_name: str,
    n: int,
    activate: Callable[[str], None],
    restore: Callable[[], None],
    seed: int = 0,
) -> Iterator[int]:
    """Each of ``n`` null edits of ``edit``'s size (:func:`surgery_plugin.core.edit.control_edit`: same rows, layers
    and step, random directions orthogonal to the edit's, seeds ``seed .. seed + n - 1``) in turn, as an adapter of
    ``peft_model`` made active by ``activate(name)``; yields its seed while it is active. Afterwards ``restore()``
    activates the caller's adapter again before the control is deleted: PEFT keeps a deleted adapter's name active,
    and the next load would fail on it."""
    from ..core.architectures import ModelGates
    from ..core.edit import control_edit
    from ..io.adapter import load_edited, write_adapter

    gates = ModelGates(peft_model)
    with tempfile.TemporaryDirectory(prefix="surgery-controls-") as work:
        for i in range(n):
            name = f"control{i}"
            folder = Path(work) / name
            folder.mkdir()
            write_adapter(control_edit(edit, seed + i), gates, folder, base_name, {"control": True})
            load_edited(peft_model, folder, adapter_name=name)
            activate(name)
            yield seed + i
            restore()
            peft_model.delete_adapter(name)


def evaluate_controls(
    peft_model: nn.Module,
    tokenizer,
    settings: dict[str, EvalSettings],
    adapter_dir,
    n: int,
    seed: int = 0,
    store: ArmStore | None = None,
) -> list[tuple[int, dict, list[dict]]]:
    """``n`` null edits of the adapter's size (:func:`control_adapters`), each evaluated on the same prompts and
    seeds as the edit (or read from ``store`` where an interrupted run finished it); the adapter ``default`` is
    active again afterwards."""
    from ..io.adapter import edit_of, read_adapter
    from ..io.stack import is_stack

    if is_stack(adapter_dir):
        raise SurgeryError(
            "--controls are null edits of one adapter's size; a stack has several (control each adapter)"
        )
    edit = edit_of(read_adapter(adapter_dir))
    out = []
    for control_seed in control_adapters(
        peft_model,
        edit,
        edit.metadata.get("base_model", ""),
        n,
        activate=peft_model.set_adapter,
        restore=lambda: peft_model.set_adapter("default"),
        seed=seed,
    ):

        def measure() -> tuple[dict, list[dict]]:
            return evaluate_plan(peft_model, tokenizer, settings)

        results, samples = store.arm(f"control_{control_seed}", measure) if store else measure()
        out.append((control_seed, results, samples))
    return out


def control_band(base_samples: list[dict], controls: list[tuple[int, dict, list[dict]]]) -> dict:
    """Per suite (and ``"<suite> k=<k>"`` for the sampled protocol, ``ppl`` and ``kl`` for the capability cost) and
    outcome, the changes the controls made (paired, on the same prompts) and their range."""
    band: dict = {}
    for seed, _, samples in controls:
        for label, name, o in comparison_rows(paired_changes(base_samples, samples)):
            band.setdefault(label, {}).setdefault(name, {"seeds": [], "changes": []})
            band[label][name]["seeds"].append(seed)
            band[label][name]["changes"].append(o["change"])
    for outcomes in band.values():
        for o in outcomes.values():
            o["range"] = [min(o["changes"]), max(o["changes"])]
    return band


def run_eval(
    model: nn.Module,
    tokenizer,
    settings: dict[str, EvalSettings],
    out: str | os.PathLike,
    meta: dict,
    behavior: Behavior | None = None,
    alpha: float | None = None,
    alphas: Sequence[float] | None = None,
    overwrite: bool = False,
    paired: bool = False,
    controls: int = 0,
) -> list[dict]:
    """Evaluate and write RUN_DIR; with ``alphas`` (an adapter loaded as ``default``) one run per alpha
    under ``RUN_DIR/alpha_<a>/`` and ``sweep.json``, from one model load; with ``paired`` the adapter(s)
    off and on, on the same prompts and seeds, under ``RUN_DIR/base/`` and ``RUN_DIR/edited/``, and their
    prompt-by-prompt comparison in ``paired.json`` / ``paired.md``. RUN_DIR is written whole at the end; the arms
    of a paired run are kept in ``RUN_DIR.arms/`` as each finishes, so the same command resumes an interrupted
    run (:mod:`surgery_plugin.evaluation.arms`)."""
    if paired:
        dtype = str(next(model.parameters()).dtype)
        store = ArmStore(out, paired_run_identity(meta.get("model"), dtype, meta.get("adapter"), settings))

        def measure_base() -> tuple[dict, list[dict]]:
            with model.disable_adapter():
                return evaluate_plan(model, tokenizer, settings)

        base, base_samples = store.arm("base", measure_base)
        edited, edited_samples = store.arm("edited", lambda: evaluate_plan(model, tokenizer, settings))
        for results, arm_alpha, adapter in ((base, None, None), (edited, alpha, meta.get("adapter"))):
            results.update(meta, adapter=adapter, alpha=arm_alpha, metric=headline(results, behavior))
        comparison = paired_changes(base_samples, edited_samples)
        if controls:
            measured = evaluate_controls(model, tokenizer, settings, meta["adapter"], controls, store=store)
            comparison["controls"] = control_band(base_samples, measured)
        with output(out, "paired_run", overwrite) as tmp:
            write_run_files(tmp / "base", base, base_samples)
            write_run_files(tmp / "edited", edited, edited_samples)
            (tmp / "paired.json").write_text(json_text(comparison), encoding="utf-8")
            (tmp / "paired.md").write_text(paired_table(comparison) + "\n", encoding="utf-8")
            arms = f"{controls} random-direction controls" if controls else "no controls"
            write_paired_plot(tmp, comparison, f"{meta.get('adapter')} against the unedited model ({arms})")
            for seed, results, samples in measured if controls else []:
                write_run_files(tmp / f"control_{seed}", results, samples)
            write_manifest(tmp, {"kind": "paired_run", "adapter": meta.get("adapter")})
        store.discard()
        print(paired_table(comparison))
        return [base, edited]
    if not alphas:
        results, samples = evaluate_plan(model, tokenizer, settings)
        results.update(meta, alpha=alpha, metric=headline(results, behavior))
        write_run(out, results, samples, overwrite=overwrite)
        print(json.dumps(results["suites"], indent=1))
        return [results]
    runs, measured = [], []
    for a in alphas:  # PEFT's LoRA scaling sets each alpha exactly
        set_alpha(model, a)
        results, samples = evaluate_plan(model, tokenizer, settings)
        results.update(meta, alpha=a, metric=headline(results, behavior))
        measured.append((a, results, samples))
        runs.append(results)
    with output(out, "sweep", overwrite) as tmp:
        for a, results, samples in measured:
            write_run_files(tmp / f"alpha_{a:g}", results, samples)
        write_alpha_sweep(tmp, runs)
    for r in runs:
        numbers = {k: {m: v for m, v in s.items() if isinstance(v, (int, float))} for k, s in r["suites"].items()}
        print(f"alpha {r['alpha']:g}: " + json.dumps(numbers))
    return runs
