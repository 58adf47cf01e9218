from pathlib import Path

import pytest
import yaml

from surgery_plugin import SurgeryError, SurgeryHyperParams
from surgery_plugin.config import shipped_hparams_path

HPARAMS = Path(__file__).resolve().parents[1] / "hparams" / "Surgery"


def test_every_shipped_yaml_loads_exactly_as_written():
    files = sorted(HPARAMS.glob("*.yaml"))
    shipped = {"smollm2-135m", "llama-7b", "llama2-7b-chat", "mistral-7b", "codellama-7b", "llama2-70b"}
    assert {f.stem for f in files} >= shipped
    for f in files:
        raw = yaml.safe_load(f.read_text())
        hp = SurgeryHyperParams.from_hparams(f)
        for key in ("alg_name", "model_name", "device", "model_parallel", "max_length"):
            assert key in raw, f"{f.name} lacks {key}"
        loaded = hp.to_dict()
        for key, value in raw.items():  # every key the file sets is read as written ("1e-4" strings as floats)
            assert loaded[key] == (_number_or_text(value) if isinstance(value, str) else value), (f.name, key)


def _number_or_text(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def test_installed_lookup_finds_the_shipped_yaml():
    path = shipped_hparams_path("smollm2-135m")
    assert path.is_file() and path.parent.name == "Surgery"
    assert SurgeryHyperParams.from_hparams(path) == SurgeryHyperParams.from_hparams(HPARAMS / "smollm2-135m.yaml")
    with pytest.raises(SurgeryError, match="no shipped hparams/Surgery/nope.yaml .*smollm2-135m"):
        shipped_hparams_path("nope")


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
