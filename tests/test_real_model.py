"""The method on real weights: SmolLM2-135M-Instruct (embedded, loaded once for this module) with the Davidson
data, the demo end to end, and the second embedded model (Gemma 3 270M). The command line on a tiny model
folder is tested in test_cli.py."""

import pytest
import torch
from helpers import REPO

from surgery_plugin import SurgeryHyperParams, apply_edit, export_adapter, load_edited, revert_edit
from surgery_plugin.pipeline import build_edit, build_probe

pytestmark = pytest.mark.real_model
HPARAMS = REPO / "hparams" / "Surgery" / "smollm2-135m.yaml"


@pytest.fixture(scope="module")
def shipped():
    return SurgeryHyperParams.from_hparams(HPARAMS)


@pytest.fixture(scope="module")
def davidson_probe(smollm2, shipped, data_dir):
    """The shipped probe recipe (layer, pooling, training) on 1000 Davidson texts per class."""
    model, tok = smollm2
    hp = shipped.replace(probe_data="davidson", probe_max_per_class=1000, feature_batch_size=32, max_length=128)
    probe, data = build_probe(model, tok, hp, data_dir=data_dir, progress=False)
    return probe, data


def test_probe_on_davidson_is_accurate(davidson_probe):
    probe, _ = davidson_probe
    assert probe.metadata["n_test"] == 400
    assert probe.metadata["test_accuracy"] >= 0.85, probe.metadata
    assert probe.metadata["test_auc"] >= 0.9, probe.metadata


def test_probe_records_how_it_was_made(davidson_probe, shipped):
    probe, data = davidson_probe
    assert probe.metadata["model"] == "smollm2-135m" and probe.metadata["layer"] == shipped.probe_layer
    assert probe.metadata["pooling"] == shipped.pooling and probe.metadata["data"] == data.description
    assert len(data.texts) == 2000 and data.labels.count(1) == 1000


@pytest.fixture(scope="module")
def shipped_edit_logits(smollm2, davidson_probe, shipped, data_dir, tmp_path_factory):
    """Logits of one prompt: base, the shipped edit in place (fp32 and a float64 reference), after reverting,
    and with the edit exported as an adapter. The shared model is given back unedited."""
    model, tok = smollm2
    probe, _ = davidson_probe
    ids = tok("You are such a", return_tensors="pt")["input_ids"]
    # the shipped variant projects out the benign mean: build_edit computes those statistics
    edit = build_edit(model, tok, shipped, probe=probe, data_dir=data_dir, progress=False).edit
    logits = {}
    with torch.no_grad():
        logits["base"] = model(ids).logits.clone()
        originals = apply_edit(model, edit)
        logits["in_place"] = model(ids).logits.clone()
        logits["reference"] = model.double()(ids).logits.clone()
        model.float()
        revert_edit(model, originals)
        logits["reverted"] = model(ids).logits.clone()
        adapter = export_adapter(
            edit, model, tmp_path_factory.mktemp("real") / "adapter", base_model_name="smollm2-135m"
        )
        peft_model = load_edited(model, adapter)
        try:
            logits["lora"] = peft_model(ids).logits.clone()
        finally:
            peft_model.unload()  # give the shared fixture model back without LoRA layers
    return logits


def test_shipped_edit_changes_the_model(shipped_edit_logits):
    assert (shipped_edit_logits["in_place"] - shipped_edit_logits["base"]).abs().max() > 1e-3


def test_revert_restores_the_model_bitwise(shipped_edit_logits):
    assert torch.equal(shipped_edit_logits["reverted"], shipped_edit_logits["base"])


def test_adapter_equals_the_in_place_edit(shipped_edit_logits):
    """With the shipped edit fp32 itself is off by ~3e-5 on logits of size ~27 (float64 reference; the same
    in-place model under another batch shape differs from itself as much): the two fp32 routes agree at 1e-4."""
    assert (shipped_edit_logits["lora"] - shipped_edit_logits["in_place"]).abs().max() <= 1e-4


def test_adapter_is_no_further_from_float64_than_the_in_place_edit(shipped_edit_logits):
    reference = shipped_edit_logits["reference"]
    lora_error = (shipped_edit_logits["lora"].double() - reference).abs().max()
    in_place_error = (shipped_edit_logits["in_place"].double() - reference).abs().max()
    assert lora_error <= 1.5 * in_place_error + 1e-6, (lora_error, in_place_error)


def test_steering_saved_as_a_peft_adapter_equals_the_hook_on_smollm2(smollm2, tmp_path):
    """On the real weights: the lora_bias adapter `surgery compare` saves for steering is the hook's edit."""
    from surgery_plugin.core.steering import added_direction
    from surgery_plugin.io.saved_edits import load_saved_edit, read_edit_record, save_steering

    model, tok = smollm2
    ids = tok("The weather today is", return_tensors="pt")["input_ids"]
    vector = 4 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits.clone()
        with added_direction(model, 10, vector):
            expected = model(ids).logits.clone()
    folder = save_steering(model, 10, vector, tmp_path / "steering", "smollm2-135m", ids)
    assert read_edit_record(folder)["kind"] == "lora"
    peft_model, _ = load_saved_edit(model, folder)
    try:
        with torch.no_grad():
            got = peft_model(ids).logits.clone()
    finally:
        peft_model.unload()  # give the shared fixture model back without LoRA layers
    assert (expected - base).abs().max() > 1e-2  # the steering changes the model
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


# ---------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def demo(data_dir, tmp_path_factory):
    import yaml

    from surgery_plugin.commands.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    small = yaml.safe_load(HPARAMS.read_text())
    small["probe_max_per_class"] = 40  # the shipped 2000 per class is the demo's; this checks the wiring
    hp_path = root / "small.yaml"
    hp_path.write_text(yaml.safe_dump(small))
    summary = run_demo(out_dir=str(root / "demo"), limit=6, data_dir=data_dir, hparams_path=str(hp_path), ppl_limit=4)
    return summary, root / "demo"


@pytest.mark.parametrize(
    "name",
    [
        "probe.safetensors",
        "adapter/adapter_model.safetensors",
        "base/results.json",
        "edited/results.json",
        "summary.json",
        "summary.md",
        "summary.png",
    ],
)
def test_demo_writes(demo, name):
    _, out = demo
    assert (out / name).is_file()


def test_demo_evaluates_base_and_edited_on_the_same_prompts(demo):
    summary, _ = demo
    assert summary["base"]["rtp"]["n"] == summary["edited"]["rtp"]["n"] == 6
    assert summary["base"]["rtp"]["prompts"] == summary["edited"]["rtp"]["prompts"]


def test_demo_reports_paired_changes_against_the_controls_band(demo):
    summary, out = demo
    band = summary["paired"]["controls"]["rtp"]
    assert all(len(o["seeds"]) == 2 and o["range"][0] <= o["range"][1] for o in band.values())
    assert "control band" in (out / "summary.md").read_text()


def test_demo_edit_changes_perplexity(demo):
    summary, _ = demo
    assert summary["base"]["ppl"]["token_perplexity"] != summary["edited"]["ppl"]["token_perplexity"]


def test_demo_base_is_the_model_with_the_adapter_off(demo):
    summary, _ = demo
    assert summary["base"]["kl"]["mean_kl"] == 0.0 < summary["edited"]["kl"]["mean_kl"]


def test_demo_uses_the_report_splits(demo):
    """RTP [500, 800), the held-out ToxiGen groups, benign documents [0, 200) (capped by limit / ppl_limit)."""
    summary, _ = demo
    assert summary["settings"]["rtp"]["start"] == 500 and summary["settings"]["rtp"]["split"] == "report"
    assert summary["base"]["rtp"]["prompts"] == "rtp/toxic.jsonl[500:506]"
    held_out = {"asian", "jewish", "lgbtq", "mental_disability", "muslim", "women"}
    assert set(summary["base"]["toxigen"]["by_group"]) == held_out  # limit 6: one prompt per held-out group
    assert summary["settings"]["ppl"]["benign_start"] == 0 and summary["base"]["ppl"]["n_texts"] == 4


def test_demo_summary_table(demo):
    _, out = demo
    text = (out / "summary.md").read_text()
    assert "| + surgery |" in text and "ToxiGen by held-out target group" in text and "| **all** |" in text


# ---------------------------------------------------------------- Gemma 3 270M (gemma3_text, GELU-tanh gated MLP)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, data_dir):
    """The second embedded model: the shipped YAML's edit along a random direction, in place and as an adapter.
    Its rows are scored by the toxic-vs-benign change of each gate's output (region_scoring: activation), so
    build_edit computes statistics on the benign reference documents and on the probe data's toxic texts (20 from
    each of its two sources, 64 tokens, for speed)."""
    from surgery_plugin.core.probe import Probe
    from surgery_plugin.models import load_model

    model, tok = load_model("gemma3-270m")
    hp = SurgeryHyperParams.from_hparams(REPO / "hparams" / "Surgery" / "gemma3-270m.yaml")
    hp = hp.replace(max_length=64, probe_max_per_class=20)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    probe = Probe(weight=torch.stack([-v, v]), bias=torch.zeros(2))
    edit = build_edit(model, tok, hp, probe=probe, data_dir=data_dir, progress=False).edit
    assert edit.metadata["region_scoring"] == "activation", edit.metadata
    assert "undesired n=40" in edit.metadata["reference_stats"], edit.metadata["reference_stats"]
    ids = tok("The weather today is", return_tensors="pt")["input_ids"]
    logits = {}
    with torch.no_grad():
        logits["base"] = model(ids).logits.clone()
        originals = apply_edit(model, edit)
        logits["in_place"] = model(ids).logits.clone()
        revert_edit(model, originals)
        logits["reverted"] = model(ids).logits.clone()
        adapter = export_adapter(
            edit, model, tmp_path_factory.mktemp("gemma3") / "adapter", base_model_name="gemma3-270m"
        )
        peft_model = load_edited(model, adapter)
        logits["lora"] = peft_model(ids).logits.clone()
        with peft_model.disable_adapter():
            logits["disabled"] = peft_model(ids).logits.clone()
    return model, tok, logits


def test_gemma3_is_the_base_model_without_a_chat_template(gemma3):
    model, tok, _ = gemma3
    assert model.config.model_type == "gemma3_text" and not getattr(tok, "chat_template", None)


def test_gemma3_edit_changes_the_model_and_reverts_bitwise(gemma3):
    _, _, logits = gemma3
    assert (logits["in_place"] - logits["base"]).abs().max() > 1e-3, "the edit must change the model"
    assert torch.equal(logits["reverted"], logits["base"])


def test_gemma3_adapter_equals_the_in_place_edit(gemma3):
    _, _, logits = gemma3
    assert (logits["lora"] - logits["in_place"]).abs().max() <= 1e-3 * logits["in_place"].abs().max()


def test_gemma3_adapter_switched_off_is_the_base_model_bitwise(gemma3):
    _, _, logits = gemma3
    assert torch.equal(logits["disabled"], logits["base"])
