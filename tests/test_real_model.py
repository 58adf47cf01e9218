"""The method on real weights: SmolLM2-135M-Instruct (embedded), the Davidson data, the CLI end to end."""

import json
import os
import stat

import pytest
import torch
from helpers import REPO, surgery

from surgery_plugin import SurgeryHyperParams, apply_edit, execute_surgery, export_adapter, load_edited, revert_edit
from surgery_plugin.core.probe import ProbeTraining
from surgery_plugin.data.loaders import load_davidson
from surgery_plugin.pipeline import edit_from_hparams, make_probe

pytestmark = pytest.mark.real_model
HPARAMS = REPO / "hparams" / "Surgery" / "smollm2-135m.yaml"


@pytest.fixture(scope="module")
def shipped():
    return SurgeryHyperParams.from_hparams(HPARAMS)


@pytest.fixture(scope="module")
def davidson_probe(smollm2, shipped, data_dir):
    model, tok = smollm2
    data = load_davidson(data_dir, max_per_class=1000, seed=0)
    return make_probe(
        model,
        tok,
        data,
        shipped.probe_layer,
        shipped.pooling,
        ProbeTraining.from_hparams(shipped),
        32,
        128,
        progress=False,
    )


def test_probe_on_davidson_is_accurate(davidson_probe):
    probe, metrics = davidson_probe
    assert metrics["n_test"] == 400
    assert metrics["test_accuracy"] >= 0.85, metrics
    assert metrics["test_auc"] >= 0.9, metrics
    assert probe.metadata["model"] == "smollm2-135m"


def test_adapter_is_exact_on_smollm2(smollm2, davidson_probe, shipped, tmp_path):
    """The adapter is the in-place edit up to fp32 rounding, and no further from the truth.

    With the shipped edit, fp32 itself is off by ~3e-5 on logits of size ~27 (float64 reference,
    and the same in-place model under another batch shape differs from itself as much), so the
    two fp32 computations are compared to each other at 1e-4 and to a float64 reference.
    """
    model, tok = smollm2
    probe, _ = davidson_probe
    ids = tok("You are such a", return_tensors="pt")["input_ids"]
    edit = edit_from_hparams(model, tok, probe, shipped, progress=False)  # the shipped variant needs benign stats
    with torch.no_grad():
        base = model(ids).logits.clone()
        originals = apply_edit(model, edit)
        in_place = model(ids).logits.clone()
        reference = model.double()(ids).logits.clone()
        model.float()
        revert_edit(model, originals)
        assert torch.equal(model(ids).logits, base)
        adapter = export_adapter(edit, model, tmp_path / "adapter", base_model_name="smollm2-135m")
        peft_model = load_edited(model, adapter)
        try:
            lora = peft_model(ids).logits
            assert (lora - in_place).abs().max() <= 1e-4
            lora_error = (lora.double() - reference).abs().max()
            in_place_error = (in_place.double() - reference).abs().max()
            assert lora_error <= 1.5 * in_place_error + 1e-6, (lora_error, in_place_error)
            assert (in_place - base).abs().max() > 1e-3, "the shipped edit must change the model"
        finally:
            peft_model.unload()  # give the shared fixture model back without LoRA layers


def test_cli_probe_edit_eval_merge(tmp_path, data_dir):
    probe = tmp_path / "probe.safetensors"
    r = surgery(
        "probe",
        "--model",
        "smollm2-135m",
        "--data",
        "davidson",
        "--max-per-class",
        60,
        "--out",
        probe,
        "--data-dir",
        data_dir,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out accuracy" in r.stdout
    adapter = tmp_path / "adapter"
    r = surgery("edit", "--model", "smollm2-135m", "--probe", probe, "--hparams", HPARAMS, "--out", adapter)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((adapter / "surgery.json").read_text())
    assert record["probe_sha256"] and record["hparams"]["alpha"] == SurgeryHyperParams.from_hparams(HPARAMS).alpha
    assert record["versions"]["torch"]
    run = tmp_path / "run"
    r = surgery(
        "eval",
        "--model",
        "smollm2-135m",
        "--adapter",
        adapter,
        "--suite",
        "rtp,ppl",
        "--judge",
        "profanity",
        "--limit",
        6,
        "--ppl-limit",
        6,
        "--data-dir",
        data_dir,
        "--out",
        run,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    rtp, ppl = results["suites"]["rtp"], results["suites"]["ppl"]
    assert (
        rtp["n"] == 6
        and 0 <= rtp["toxic_rate"] <= 1
        and 0 <= rtp["mean_toxicity"] <= 1
        and rtp["judge"] == "profanity"
    )
    assert ppl["token_perplexity"] > 1 and ppl["n_tokens"] > 0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"suite", "prompt", "completion", "scores"} <= set(samples[0])
    # alpha sweep with one model load: alpha 0 is the base model, the made alpha the adapter as made
    made_alpha = record["alpha"]
    r = surgery(
        "eval",
        "--model",
        "smollm2-135m",
        "--adapter",
        adapter,
        "--alpha-sweep",
        f"0,{made_alpha}",
        "--suite",
        "rtp,ppl",
        "--limit",
        6,
        "--ppl-limit",
        6,
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "sweep",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    assert [run["alpha"] for run in sweep] == [0.0, made_alpha] and (tmp_path / "sweep" / "sweep.png").is_file()
    r = surgery(
        "eval",
        "--model",
        "smollm2-135m",
        "--suite",
        "rtp,ppl",
        "--limit",
        6,
        "--ppl-limit",
        6,
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "base",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    base = json.loads((tmp_path / "base" / "results.json").read_text())["suites"]
    assert sweep[0]["suites"]["ppl"]["token_perplexity"] == pytest.approx(base["ppl"]["token_perplexity"], rel=1e-6)
    base_samples = (tmp_path / "base" / "samples.jsonl").read_text()
    assert (tmp_path / "sweep" / "alpha_0" / "samples.jsonl").read_text() == base_samples
    as_made = json.loads((tmp_path / "sweep" / f"alpha_{made_alpha:g}" / "results.json").read_text())["suites"]
    assert as_made["ppl"]["token_perplexity"] == pytest.approx(results["suites"]["ppl"]["token_perplexity"], rel=1e-5)
    assert (tmp_path / "sweep" / f"alpha_{made_alpha:g}" / "samples.jsonl").read_text() == (
        run / "samples.jsonl"
    ).read_text()

    merged = tmp_path / "merged"
    r = surgery("merge", "--model", "smollm2-135m", "--adapter", adapter, "--out", merged)
    assert r.returncode == 0, r.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "llama"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "surgery_source.json"):  # safetensors alone would write 0600
        assert stat.S_IMODE(os.stat(merged / name).st_mode) == 0o666 & ~umask, name


def test_demo_runs_end_to_end(tmp_path, data_dir):
    import yaml

    from surgery_plugin.commands.demo import run_demo

    small = yaml.safe_load(HPARAMS.read_text())
    small["probe_max_per_class"] = 40  # the shipped 2000 per class is the demo's; this checks the wiring
    hp_path = tmp_path / "small.yaml"
    hp_path.write_text(yaml.safe_dump(small))
    summary = run_demo(
        out_dir=str(tmp_path / "demo"), limit=12, data_dir=data_dir, hparams_path=str(hp_path), ppl_limit=4
    )
    out = tmp_path / "demo"
    for name in (
        "probe.safetensors",
        "adapter/adapter_model.safetensors",
        "base/results.json",
        "edited/results.json",
        "summary.json",
        "summary.md",
        "summary.png",
    ):
        assert (out / name).is_file(), name
    assert summary["base"]["rtp"]["n"] == summary["edited"]["rtp"]["n"] == 12
    assert summary["base"]["ppl"]["token_perplexity"] != summary["edited"]["ppl"]["token_perplexity"]
    assert summary["base"]["kl"]["mean_kl"] == 0.0 < summary["edited"]["kl"]["mean_kl"], "adapter off = the base model"
    # the report splits: RTP [500, 800), held-out ToxiGen groups, benign [0, 200)
    assert summary["settings"]["rtp"]["start"] == 500
    assert summary["base"]["rtp"]["prompts"] == "rtp/toxic.jsonl[500:512]"
    from surgery_plugin.data.splits import TOXIGEN_REPORT_GROUPS

    assert set(summary["base"]["toxigen"]["by_group"]) == set(TOXIGEN_REPORT_GROUPS)
    text = (out / "summary.md").read_text()
    assert "| + surgery |" in text and "ToxiGen by held-out target group" in text and "| **all** |" in text


def test_gemma3_alias_edits_and_exports_exactly(tmp_path):
    """The second embedded model (Gemma 3 270M base, gemma3_text, GELU-tanh gated MLP) on real weights:
    the shipped YAML's edit as an adapter equals the in-place edit, and the adapter switches off bitwise."""
    from surgery_plugin.models import load_model

    model, tok = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and not getattr(tok, "chat_template", None)
    hp = SurgeryHyperParams.from_hparams(REPO / "hparams" / "Surgery" / "gemma3-270m.yaml")
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    edit = execute_surgery(model, torch.stack([-v, v])[1], hp)
    ids = tok("The weather today is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits.clone()
        originals = apply_edit(model, edit)
        in_place = model(ids).logits.clone()
        revert_edit(model, originals)
        assert torch.equal(model(ids).logits, base)
        peft_model = load_edited(
            model, export_adapter(edit, model, tmp_path / "adapter", base_model_name="gemma3-270m")
        )
        try:
            assert (peft_model(ids).logits - in_place).abs().max() <= 1e-3 * in_place.abs().max()
            assert (in_place - base).abs().max() > 1e-3, "the edit must change the model"
            with peft_model.disable_adapter():
                assert torch.equal(peft_model(ids).logits, base)
        finally:
            peft_model.unload()
