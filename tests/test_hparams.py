from pathlib import Path

import pytest

from surgery_plugin import SurgeryError, SurgeryHyperParams

HPARAMS = Path(__file__).resolve().parents[1] / "hparams" / "Surgery"


def test_every_shipped_yaml_loads_with_easyedit_fields():
    files = sorted(HPARAMS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"smollm2-135m", "llama-7b", "llama2-7b-chat", "mistral-7b", "codellama-7b", "llama2-70b"}
    for f in files:
        hp = SurgeryHyperParams.from_hparams(f)
        assert hp.alg_name == "Surgery"
        for field in ("model_name", "device", "model_parallel", "max_length"):
            assert getattr(hp, field) is not None


def test_paper_settings():
    hp = SurgeryHyperParams.from_hparams(HPARAMS / "llama-7b")  # .yaml optional
    assert (hp.alpha, hp.top_k, hp.probe_layer, hp.normalize) == (1.08, 16384, -1, False)
    assert isinstance(hp.probe_lr, float) and hp.probe_lr == 1e-4  # "1e-4" in YAML 1.1 is a string
    chat = SurgeryHyperParams.from_hparams(HPARAMS / "llama2-7b-chat.yaml")
    assert (chat.alpha, chat.behavior) == (1.0, "jailbreak")


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("alg_name: Surgery\nalpha: 1.0\nalhpa: 2.0\n")
    with pytest.raises(SurgeryError, match="unknown key 'alhpa'"):
        SurgeryHyperParams.from_hparams(path)


def test_wrong_alg_and_bad_values(tmp_path):
    (tmp_path / "rome.yaml").write_text("alg_name: ROME\n")
    with pytest.raises(SurgeryError, match="ROME"):
        SurgeryHyperParams.from_hparams(tmp_path / "rome.yaml")
    (tmp_path / "nan.yaml").write_text("alg_name: Surgery\nalpha: .nan\n")
    with pytest.raises(SurgeryError, match="alpha must be a finite number"):
        SurgeryHyperParams.from_hparams(tmp_path / "nan.yaml")
    with pytest.raises(SurgeryError, match="not found"):
        SurgeryHyperParams.from_hparams(tmp_path / "missing")
