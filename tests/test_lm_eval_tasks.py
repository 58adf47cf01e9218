"""The packaged lm-eval tasks surgery_toxigen / surgery_advbench / surgery_safeedit*, run by the real `lm_eval` CLI
offline on SmolLM2 with a surgery adapter loaded through ``peft=``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgery_plugin import SurgeryHyperParams, execute_surgery, export_adapter
from surgery_plugin.data.loaders import load_davidson, load_safeedit
from surgery_plugin.evaluation.metrics import is_refusal
from surgery_plugin.evaluation.protocols import PROTOCOLS
from surgery_plugin.integrations.lm_eval import generate, tasks_path
from surgery_plugin.models import resolve_model_path
from surgery_plugin.pipeline import make_probe

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
pytestmark = pytest.mark.real_model

TASKS = {task.name for protocol in PROTOCOLS.values() for task in protocol.lm_eval}


def test_shipped_yamls_are_what_the_protocols_generate():
    files = generate.render()
    assert generate.shipped_files() == set(files), "a YAML without a protocol, or a protocol task without its YAML"
    for name, text in files.items():
        assert (tasks_path() / name).read_text() == text, (
            f"{name} differs: run python -m surgery_plugin.lm_eval_tasks.generate"
        )
    assert generate.main(["--check"]) == 0


def test_every_task_and_the_safeedit_group_are_listed_by_lm_eval(data_dir, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("SURGERY_DATA_DIR", str(data_dir))
    manager = TaskManager(include_path=str(tasks_path()), include_defaults=False)
    assert TASKS | {"surgery_safeedit"} <= set(manager.all_tasks)
    assert {"surgery_rtp", "surgery_toxigen", "surgery_advbench", "surgery_ppl", "surgery_safeedit_ds"} <= TASKS
    # the template's settings reach each SafeEdit task, which reads its own field
    tasks = manager.load_task_or_group(["surgery_safeedit_dg_othera", "surgery_rtp"])
    other_a, rtp = tasks["surgery_safeedit_dg_othera"], tasks["surgery_rtp"]
    assert other_a.config.generation_kwargs["max_gen_toks"] == PROTOCOLS["safeedit"].max_new_tokens == 128
    assert other_a.config.metadata["field"] == "DG_otherA" and len(other_a.eval_docs) == 93
    assert rtp.config.generation_kwargs["max_gen_toks"] == PROTOCOLS["rtp"].max_new_tokens == 20


@pytest.fixture(scope="module")
def adapter(smollm2, data_dir, tmp_path_factory):
    model, tok = smollm2
    probe, _ = make_probe(model, tok, load_davidson(data_dir, max_per_class=40, seed=0), layer=10, progress=False)
    edit = execute_surgery(model, probe, SurgeryHyperParams(top_k=0.05, alpha=1.0, normalize=True))
    return export_adapter(
        edit, model, tmp_path_factory.mktemp("lmeval_tasks") / "adapter", base_model_name="smollm2-135m"
    )


def test_new_tasks_run_offline_with_peft_adapter(adapter, data_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).with_name("lm_eval")),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={resolve_model_path('smollm2-135m')},peft={adapter}",
        "--include_path",
        str(tasks_path()),
        "--tasks",
        "surgery_toxigen,surgery_advbench,surgery_safeedit_dg_onlyq",
        "--limit",
        "2",
        "--gen_kwargs",
        "max_gen_toks=8",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", SURGERY_DATA_DIR=str(data_dir), SURGERY_LM_EVAL_JUDGE="profanity")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]
    assert 0 <= results["surgery_toxigen"]["toxic,none"] <= 1 and 0 <= results["surgery_toxigen"]["toxicity,none"] <= 1
    assert (
        0 <= results["surgery_advbench"]["refusal,none"] <= 1 and 0 <= results["surgery_advbench"]["harmful,none"] <= 1
    )
    assert 0 <= results["surgery_safeedit_dg_onlyq"]["safe,none"] <= 1
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.split("_", 1)[1].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    toxigen = samples["surgery_toxigen"]
    assert len(toxigen) == 2 and toxigen[0]["doc"]["group"] != toxigen[1]["doc"]["group"], (
        "round-robin over target groups"
    )
    assert all("\n" not in s["filtered_resps"][0] for s in toxigen)
    advbench = samples["surgery_advbench"]
    assert [s["refusal"] for s in advbench] == [float(is_refusal(s["filtered_resps"][0])) for s in advbench]
    onlyq = samples["surgery_safeedit_dg_onlyq"]
    questions = [r["question"] for r in load_safeedit(data_dir)[:2]]
    assert [s["doc"]["metric"] for s in onlyq] == ["DG_onlyQ"] * 2 and [s["doc"]["prompt"] for s in onlyq] == questions
