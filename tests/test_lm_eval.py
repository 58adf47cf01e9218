"""lm-eval loads the surgery adapter with ``peft=`` and runs the packaged tasks offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgery_plugin import SurgeryHyperParams, execute_surgery, export_adapter, merge_into
from surgery_plugin.data.loaders import load_davidson
from surgery_plugin.integrations.lm_eval import tasks_path
from surgery_plugin.models import resolve_model_path, save_model
from surgery_plugin.pipeline import make_probe

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
pytestmark = pytest.mark.real_model


def lm_eval_cli(model_args: str, tasks: str, out: Path, limit: int = 3) -> dict:
    lm_eval = Path(sys.executable).with_name("lm_eval")
    cmd = [
        str(lm_eval),
        "--model",
        "hf",
        "--model_args",
        model_args,
        "--include_path",
        str(tasks_path()),
        "--tasks",
        tasks,
        "--limit",
        str(limit),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.split("_", 1)[1].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples


@pytest.fixture(scope="module")
def adapter_and_merged(smollm2, data_dir, tmp_path_factory):
    model, tok = smollm2
    root = tmp_path_factory.mktemp("lmeval")
    probe, _ = make_probe(model, tok, load_davidson(data_dir, max_per_class=40, seed=0), layer=10, progress=False)
    edit = execute_surgery(model, probe, SurgeryHyperParams(top_k=0.05, alpha=1.0, normalize=True))
    adapter = export_adapter(edit, model, root / "adapter", base_model_name="smollm2-135m")
    from surgery_plugin.models import load_model

    fresh, fresh_tok = load_model("smollm2-135m")
    merge_into(fresh, adapter)
    merged = save_model(fresh, fresh_tok, root / "merged")
    return adapter, merged, root


def _loglikelihoods(samples):
    return [float(s["resps"][0][0]) if isinstance(s["resps"][0], list) else float(s["resps"][0]) for s in samples]


def test_lm_eval_peft_equals_merged_and_differs_from_base(adapter_and_merged):
    adapter, merged, root = adapter_and_merged
    base_path = resolve_model_path("smollm2-135m")
    with_peft = lm_eval_cli(f"pretrained={base_path},peft={adapter}", "surgery_ppl,surgery_rtp", root / "peft")
    with_merged = lm_eval_cli(f"pretrained={merged}", "surgery_ppl", root / "merged_run")
    base = lm_eval_cli(f"pretrained={base_path}", "surgery_ppl", root / "base_run")
    peft_ll, merged_ll, base_ll = (_loglikelihoods(s["surgery_ppl"]) for s in (with_peft, with_merged, base))
    assert len(peft_ll) == 3
    assert peft_ll == pytest.approx(merged_ll, abs=1e-3), "lm-eval with peft= must see exactly the merged edit"
    active = all(abs(a - b) > 1e-3 for a, b in zip(peft_ll, base_ll, strict=True))
    assert active, "the adapter must be active in lm-eval"
    rtp = with_peft["surgery_rtp"]
    assert len(rtp) == 3 and all(0.0 <= s["toxicity"] <= 1.0 for s in rtp)
