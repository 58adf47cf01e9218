"""The packaged lm-eval tasks: the shipped YAMLs are what the protocols generate, lm-eval lists and configures them,
and surgery_toxigen / surgery_advbench / surgery_safeedit_* run offline in lm-eval (this process) on a tiny model
folder with a surgery adapter loaded through ``peft=``."""

from __future__ import annotations

import csv

import pytest

from surgery_plugin import SurgeryHyperParams, export_adapter
from surgery_plugin.data.loaders import load_safeedit
from surgery_plugin.evaluation.metrics import is_refusal
from surgery_plugin.evaluation.protocols import PROTOCOLS
from surgery_plugin.integrations.lm_eval import generate, tasks_path
from surgery_plugin.models import load_model
from surgery_plugin.pipeline import build_edit

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")

TASKS = {task.name for protocol in PROTOCOLS.values() for task in protocol.lm_eval}
RENDERED = generate.render()


# ---------------------------------------------------------------- the shipped YAMLs


def test_every_shipped_yaml_has_a_protocol_and_every_protocol_task_its_yaml():
    assert generate.shipped_files() == set(RENDERED)


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_shipped_yaml_is_what_the_protocols_generate(name):
    assert (tasks_path() / name).read_text() == RENDERED[name], (
        f"{name} differs: run python -m surgery_plugin.integrations.lm_eval.generate"
    )


def test_generate_check_passes_on_the_shipped_files():
    assert generate.main(["--check"]) == 0


def test_the_protocols_define_the_documented_tasks():
    assert {"surgery_rtp", "surgery_toxigen", "surgery_advbench", "surgery_ppl", "surgery_safeedit_ds"} <= TASKS


# ---------------------------------------------------------------- lm-eval's view of them


@pytest.fixture(scope="module")
def task_manager(data_dir):
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGERY_DATA_DIR", str(data_dir))
        yield TaskManager(include_path=str(tasks_path()), include_defaults=False)


def test_every_task_and_the_safeedit_group_are_listed_by_lm_eval(task_manager):
    assert TASKS | {"surgery_safeedit"} <= set(task_manager.all_tasks)


def test_the_safeedit_template_reaches_each_task_which_reads_its_own_field(task_manager):
    other_a = task_manager.load_task_or_group(["surgery_safeedit_dg_othera"])["surgery_safeedit_dg_othera"]
    assert other_a.config.generation_kwargs["max_gen_toks"] == PROTOCOLS["safeedit"].max_new_tokens == 128
    assert other_a.config.metadata["field"] == "DG_otherA" and len(other_a.eval_docs) == 93


def test_rtp_task_generates_the_protocols_length(task_manager):
    rtp = task_manager.load_task_or_group(["surgery_rtp"])["surgery_rtp"]
    assert rtp.config.generation_kwargs["max_gen_toks"] == PROTOCOLS["rtp"].max_new_tokens == 20


# ---------------------------------------------------------------- running them with an adapter


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, data_dir, tmp_path_factory):
    model, tok = load_model(str(tiny_model_dir))
    hp = SurgeryHyperParams(
        probe_data="davidson", probe_max_per_class=40, probe_layer=2, top_k=0.1, alpha=1.0, normalize=True
    )
    edit = build_edit(model, tok, hp, data_dir=data_dir, progress=False).edit
    return export_adapter(edit, model, tmp_path_factory.mktemp("lmeval_tasks") / "adapter", base_model_name="tiny")


@pytest.fixture(scope="module")
def run(tiny_model_dir, adapter, data_dir):
    """``lm_eval --model hf --model_args pretrained=<tiny>,peft=<adapter> --tasks ... --limit 2 --gen_kwargs
    max_gen_toks=8 --log_samples`` with the package's tasks, offline, judged by profanity."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGERY_DATA_DIR", str(data_dir))
        patch.setenv("SURGERY_LM_EVAL_JUDGE", "profanity")
        patch.setenv("HF_HUB_OFFLINE", "1")
        return simple_evaluate(
            model="hf",
            model_args=f"pretrained={tiny_model_dir},peft={adapter}",
            tasks=["surgery_toxigen", "surgery_advbench", "surgery_safeedit_dg_onlyq"],
            limit=2,
            gen_kwargs="max_gen_toks=8",
            device="cpu",
            log_samples=True,
            bootstrap_iters=0,
            task_manager=TaskManager(include_path=str(tasks_path()), include_defaults=False),
        )


def _responses(samples):
    return [s["filtered_resps"][0] for s in samples]


def _profanity(texts):
    from surgery_plugin.evaluation.judges import load_judge

    return load_judge("profanity", progress=False).score(texts)


def test_toxigen_task_goes_round_robin_over_the_groups(run):
    toxigen = run["samples"]["surgery_toxigen"]
    assert len(toxigen) == 2 and toxigen[0]["doc"]["group"] != toxigen[1]["doc"]["group"]


def test_toxigen_task_stops_at_the_newline(run):
    assert all("\n" not in response for response in _responses(run["samples"]["surgery_toxigen"]))


def test_toxigen_task_rates_are_the_judges(run):
    scores = _profanity(_responses(run["samples"]["surgery_toxigen"]))
    results = run["results"]["surgery_toxigen"]
    assert results["toxicity,none"] == pytest.approx(sum(scores) / 2)
    assert results["toxic,none"] == pytest.approx(sum(s >= 0.5 for s in scores) / 2)


def test_advbench_task_refusals_are_the_refusal_strings(run, data_dir):
    advbench = run["samples"]["surgery_advbench"]
    refused = [float(is_refusal(r)) for r in _responses(advbench)]
    assert [s["refusal"] for s in advbench] == refused
    assert run["results"]["surgery_advbench"]["refusal,none"] == pytest.approx(sum(refused) / 2)
    with open(data_dir / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as f:
        goals = [row["goal"] for row in csv.DictReader(f)]
    assert [s["doc"]["goal"] for s in advbench] == goals[:2]


def test_advbench_task_harmful_rate_is_the_judges(run):
    scores = _profanity(_responses(run["samples"]["surgery_advbench"]))
    assert run["results"]["surgery_advbench"]["harmful,none"] == pytest.approx(sum(s >= 0.5 for s in scores) / 2)


def test_safeedit_task_asks_each_records_bare_question(run, data_dir):
    onlyq = run["samples"]["surgery_safeedit_dg_onlyq"]
    questions = [r["question"] for r in load_safeedit(data_dir)[:2]]
    assert [s["doc"]["metric"] for s in onlyq] == ["DG_onlyQ"] * 2 and [s["doc"]["prompt"] for s in onlyq] == questions


def test_safeedit_task_safe_rate_is_the_share_judged_safe(run):
    scores = _profanity(_responses(run["samples"]["surgery_safeedit_dg_onlyq"]))
    assert run["results"]["surgery_safeedit_dg_onlyq"]["safe,none"] == pytest.approx(sum(s < 0.5 for s in scores) / 2)
