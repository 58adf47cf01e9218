import pytest
import torch
from helpers import FAMILIES, make_tiny

from surgery_plugin import SurgeryError, SurgeryHyperParams, apply_edit, execute_surgery, revert_edit
from surgery_plugin.core import architectures
from surgery_plugin.core.features import hidden_features


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_rows_found_in_every_layer(family):
    model = make_tiny(family)
    assert len(architectures.gate_module_names(model)) == 3
    width = 4 * 32 if family == "falcon" else 48  # falcon's MLP is 4 x hidden, the others' as configured
    assert (architectures.num_gate_rows(model), architectures.hidden_size(model)) == (width, 32)
    for layer in range(3):
        assert architectures.gate_rows(model, layer).shape == (width, 32)


def _edit_and_logits(family, char_tokenizer):
    model = make_tiny(family)
    ids = torch.tensor([char_tokenizer("some text to edit")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    direction = torch.randn(architectures.hidden_size(model), generator=torch.Generator().manual_seed(0))
    edit = execute_surgery(model, direction, SurgeryHyperParams(top_k=12, alpha=2.0))
    originals = apply_edit(model, edit)
    with torch.no_grad():
        after = model(ids).logits.clone()
    return model, ids, before, after, originals


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_changes_the_output(family, char_tokenizer):
    _, _, before, after, _ = _edit_and_logits(family, char_tokenizer)
    assert not torch.allclose(before, after), "editing the gate rows must change the model's output"


@pytest.mark.parametrize("family", FAMILIES)
def test_revert_restores_the_output(family, char_tokenizer):
    model, ids, before, _, originals = _edit_and_logits(family, char_tokenizer)
    revert_edit(model, originals)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_early_stopped_features_equal_full_hidden_states(family, char_tokenizer):
    model = make_tiny(family)
    text = "hello world, features"
    ids = torch.tensor([char_tokenizer(text)["input_ids"]])
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
    for index in (1, 2, len(full) - 1):
        pooled = hidden_features(model, char_tokenizer, [text], layer=index, pooling="mean", progress=False)
        torch.testing.assert_close(pooled[0], full[index][0].mean(0), rtol=1e-5, atol=1e-5)


def test_fused_phi3_gate_is_first_half():
    model = make_tiny("phi3")
    weight = architectures.gate_modules(model)[0].weight
    assert weight.shape[0] == 2 * architectures.num_gate_rows(model)
    assert architectures.gate_rows(model, 0).data_ptr() == weight.data_ptr()


def test_conv1d_rows_are_columns_of_the_weight():
    model = make_tiny("gpt2")
    weight = architectures.gate_modules(model)[0].weight  # (in, out)
    torch.testing.assert_close(architectures.gate_rows(model, 0)[5], weight[:, 5])


def test_unknown_model_type_names_it_and_the_supported_list():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            vocab_size=50,
            is_decoder=True,
        )
    )
    with pytest.raises(SurgeryError, match=r"model type 'bert' is not supported; supported: .*llama"):
        architectures.gate_spec(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_readout_and_activation_rebuild_the_mlp(family):
    """sum_r act(g_r . x + b_r) (up_r . x + c_r) down_r + bias = the layer's own MLP on x, for every family."""
    from surgery_plugin.core.architectures import gate_activation, gate_rows, mlp_readout

    model = make_tiny(family)
    layer = architectures.decoder_layers(model)[1]
    x = torch.randn(5, architectures.hidden_size(model), generator=torch.Generator().manual_seed(0))
    readout, act = mlp_readout(model, 1), gate_activation(model)
    hidden = act(x @ gate_rows(model, 1).T.float() + readout.gate_bias)
    if readout.up_rows is not None:
        hidden = hidden * (x @ readout.up_rows.T + readout.up_bias)
    spec = architectures.gate_spec(model)
    down = layer.get_submodule(spec.down_path)
    rebuilt = hidden @ readout.down_columns + (down.bias if down.bias is not None else 0)
    with torch.no_grad():
        if family == "opt":  # no mlp module: fc1 -> activation -> fc2 in the layer itself
            actual = layer.fc2(layer.activation_fn(layer.fc1(x)))
        else:
            actual = layer.mlp(x)
    torch.testing.assert_close(rebuilt.detach(), actual, rtol=1e-4, atol=1e-4)
