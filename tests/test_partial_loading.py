"""Probe features from the first layers only: the same features as the whole model, from less of it."""

import pytest
import torch
from helpers import FAMILIES, make_tiny, run_cli

from surgery_plugin import SurgeryError, models
from surgery_plugin.core import architectures
from surgery_plugin.core.features import hidden_features, resolve_layer
from surgery_plugin.core.probe import Probe
from surgery_plugin.models import load_causal_lm

TEXTS = ["you are a stupid idiot", "i love sunny days and long walks", "x", "the weather is nice", ""]


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", params=FAMILIES)
def sharded(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix") / request.param
    make_tiny(request.param).save_pretrained(folder, max_shard_size="20KB")
    return str(folder), load_causal_lm(str(folder), dtype=torch.float32).eval()


PREFIXES = [(0, 1), (1, 1), (2, 2), (-2, 2)]  # probe layer -> decoder layers a prefix needs


@pytest.mark.parametrize("layer, kept", PREFIXES)
def test_prefix_loads_only_the_layers_it_needs(sharded, layer, kept):
    folder, whole = sharded
    prefix = load_causal_lm(folder, dtype=torch.float32, probe_layer=layer)
    assert len(architectures.decoder_layers(prefix)) == kept and architectures.full_num_layers(prefix) == 3
    assert _n_params(prefix) < _n_params(whole)
    assert resolve_layer(prefix, layer) == resolve_layer(whole, layer)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("layer", [layer for layer, _ in PREFIXES])
def test_prefix_features_equal_the_whole_models(sharded, layer, pooling, char_tokenizer):
    folder, whole = sharded
    prefix = load_causal_lm(folder, dtype=torch.float32, probe_layer=layer).eval()
    want = hidden_features(whole, char_tokenizer, TEXTS, layer, pooling, batch_size=2, progress=False)
    got = hidden_features(prefix, char_tokenizer, TEXTS, layer, pooling, batch_size=2, progress=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("layer", [-1, 3, 7, -9])
def test_final_state_and_out_of_range_layers_load_the_whole_model(tmp_path, layer):
    folder = tmp_path / "llama"
    make_tiny("llama").save_pretrained(folder)
    assert len(architectures.decoder_layers(load_causal_lm(str(folder), probe_layer=layer))) == 3


def test_a_prefix_refuses_features_past_its_layers(tmp_path, char_tokenizer):
    folder = tmp_path / "llama"
    make_tiny("llama").save_pretrained(folder)
    prefix = load_causal_lm(str(folder), probe_layer=1)
    with pytest.raises(SurgeryError, match="needs 2 layers; this model was loaded with 1"):
        hidden_features(prefix, char_tokenizer, TEXTS, 2, progress=False)


@pytest.mark.real_model
def test_smollm2_prefix_features_equal_the_whole_models(smollm2):
    whole, tok = smollm2
    prefix, _ = models.load_model("smollm2-135m", probe_layer=10)
    assert len(architectures.decoder_layers(prefix)) == 10 and architectures.full_num_layers(prefix) == 30
    assert prefix.lm_head.weight is prefix.model.embed_tokens.weight  # tied embeddings stay tied
    texts = TEXTS[:4] + ["A much longer sentence, so that the batch carries real padding on the right side."]
    for pooling in ("mean", "last"):
        want = hidden_features(whole, tok, texts, 10, pooling, batch_size=3, progress=False)
        assert torch.equal(hidden_features(prefix, tok, texts, 10, pooling, batch_size=3, progress=False), want)


@pytest.fixture
def probe_csv(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"nasty word {i} idiot,1\nsunny day {i} nice,0\n" for i in range(20)))
    return data


@pytest.fixture
def loaded_layers(monkeypatch):
    """How many decoder layers each model the CLI loads has."""
    layers = []

    def spy(*args, **kwargs):
        model = load_causal_lm(*args, **kwargs)
        layers.append(len(architectures.decoder_layers(model)))
        return model

    monkeypatch.setattr(models, "load_causal_lm", spy)
    return layers


def _cli_probe(model_dir, data, out):
    result = run_cli("probe", "--model", model_dir, "--data", data, "--layer", 1, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return Probe.load(out)


def test_cli_probe_loads_only_the_layers_before_the_probe_layer(tiny_model_dir, probe_csv, tmp_path, loaded_layers):
    probe = _cli_probe(tiny_model_dir, probe_csv, tmp_path / "prefix.safetensors")
    assert loaded_layers == [1]
    assert probe.metadata["layer"] == 1


def test_cli_probe_from_a_prefix_equals_the_whole_models(
    tiny_model_dir, probe_csv, tmp_path, loaded_layers, monkeypatch
):
    prefix = _cli_probe(tiny_model_dir, probe_csv, tmp_path / "prefix.safetensors")
    monkeypatch.setattr(models, "load_prefix_config", lambda *_args: None)  # no prefix: the whole model
    whole = _cli_probe(tiny_model_dir, probe_csv, tmp_path / "whole.safetensors")
    assert loaded_layers == [1, 3]
    assert torch.equal(prefix.weight, whole.weight) and torch.equal(prefix.bias, whole.bias)
