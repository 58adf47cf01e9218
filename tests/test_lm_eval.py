"""lm-eval (in this process, ``simple_evaluate``) loads a surgery adapter with ``peft=`` and runs the packaged tasks
offline; a tiny model folder keeps every run small, the adapter and lm-eval are real."""

from __future__ import annotations

import pytest

from surgery_plugin import SurgeryHyperParams, export_adapter, merge_into
from surgery_plugin.integrations.lm_eval import tasks_path
from surgery_plugin.models import load_model, save_model
from surgery_plugin.pipeline import build_edit

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")


def lm_eval_run(model_args: str, tasks: str, limit: int = 3, **kwargs) -> dict:
    """``lm_eval --model hf --model_args ... --include_path $(surgery tasks-path) --tasks ... --log_samples``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks.split(","),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        device="cpu",
        task_manager=TaskManager(include_path=str(tasks_path()), include_defaults=False),
        **kwargs,
    )


@pytest.fixture(scope="module")
def lm_eval_env(data_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGERY_DATA_DIR", str(data_dir))
        patch.setenv("SURGERY_LM_EVAL_JUDGE", "profanity")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def adapter_and_merged(tiny_model_dir, data_dir, tmp_path_factory):
    """A Davidson probe's edit of the tiny model as an adapter, and the same edit merged into a model folder."""
    model, tok = load_model(str(tiny_model_dir))
    root = tmp_path_factory.mktemp("lmeval")
    hp = SurgeryHyperParams(
        probe_data="davidson", probe_max_per_class=40, probe_layer=2, top_k=0.1, alpha=1.0, normalize=True
    )
    edit = build_edit(model, tok, hp, data_dir=data_dir, progress=False).edit
    adapter = export_adapter(edit, model, root / "adapter", base_model_name="tiny-llama")
    fresh, fresh_tok = load_model(str(tiny_model_dir))
    merge_into(fresh, adapter)
    merged = save_model(fresh, fresh_tok, root / "merged")
    return adapter, merged


def _loglikelihoods(samples):
    return [float(s["resps"][0][0]) if isinstance(s["resps"][0], list) else float(s["resps"][0]) for s in samples]


@pytest.fixture(scope="module")
def ppl_runs(tiny_model_dir, adapter_and_merged, lm_eval_env):
    adapter, merged = adapter_and_merged
    with_peft = lm_eval_run(f"pretrained={tiny_model_dir},peft={adapter}", "surgery_ppl,surgery_rtp")
    with_merged = lm_eval_run(f"pretrained={merged}", "surgery_ppl")
    base = lm_eval_run(f"pretrained={tiny_model_dir}", "surgery_ppl")
    return with_peft, with_merged, base


def test_lm_eval_with_peft_equals_the_merged_edit(ppl_runs):
    with_peft, with_merged, _ = ppl_runs
    peft_ll = _loglikelihoods(with_peft["samples"]["surgery_ppl"])
    assert len(peft_ll) == 3
    assert peft_ll == pytest.approx(_loglikelihoods(with_merged["samples"]["surgery_ppl"]), abs=1e-3)


def test_lm_eval_with_peft_differs_from_the_base_model(ppl_runs):
    with_peft, _, base = ppl_runs
    peft_ll = _loglikelihoods(with_peft["samples"]["surgery_ppl"])
    base_ll = _loglikelihoods(base["samples"]["surgery_ppl"])
    assert all(abs(a - b) > 1e-3 for a, b in zip(peft_ll, base_ll, strict=True)), "the adapter must be active"


def test_lm_eval_rtp_scores_each_continuation_with_the_judge(ppl_runs):
    from surgery_plugin.evaluation.judges import load_judge

    with_peft, _, _ = ppl_runs
    rtp = with_peft["samples"]["surgery_rtp"]
    responses = [s["filtered_resps"][0] for s in rtp]
    scores = load_judge("profanity", progress=False).score(responses)
    assert len(rtp) == 3 and [s["toxicity"] for s in rtp] == pytest.approx(scores)
    assert with_peft["results"]["surgery_rtp"]["toxic,none"] == pytest.approx(sum(s >= 0.5 for s in scores) / 3)
