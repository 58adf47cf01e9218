"""Steering hooks (core/steering.py) and the refusal-direction scoring (core/refusal.py), on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FAMILIES, CharTokenizer, make_tiny

from surgery_plugin.core import architectures
from surgery_plugin.core.features import _captures
from surgery_plugin.core.refusal import (
    eligible_layers,
    mean_differences,
    refusal_log_odds,
    refusal_token_ids,
    score_candidates,
)
from surgery_plugin.core.steering import ablated_direction, added_direction
from surgery_plugin.errors import SurgeryError
from surgery_plugin.evaluation.generation import next_token_logprobs

IDS = torch.tensor([[5, 9, 13, 20, 31]])
MASK = torch.ones_like(IDS)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return make_tiny(request.param)


@torch.no_grad()
def _layer_inputs(model):
    n = len(architectures.decoder_layers(model))
    hidden, _ = _captures(model, IDS, MASK, list(range(n)))
    return hidden


def test_added_direction_shifts_exactly_that_layers_input(model):
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    before = _layer_inputs(model)
    with added_direction(model, 1, v):
        during = _layer_inputs(model)
    after = _layer_inputs(model)
    torch.testing.assert_close(during[0], before[0])  # earlier layers: untouched
    # the captured input of layer 1 is what layer 0 wrote, plus v (the capture hook runs after the steering one)
    torch.testing.assert_close(during[1], before[1] + v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[2], before[2])  # hooks removed on exit


def test_ablated_direction_leaves_no_component_in_any_layer_input(model):
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    unit = v / v.norm()
    with ablated_direction(model, v):
        during = _layer_inputs(model)
        with torch.no_grad():
            logits = model(IDS).logits
    for layer, h in during.items():
        assert float((h @ unit).abs().max()) < 1e-4, layer
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, logits)  # it did change the output, and is gone again


def test_refusal_log_odds_by_hand():
    logprobs = torch.log(torch.tensor([[0.3, 0.1, 0.2, 0.4], [0.05, 0.05, 0.05, 0.85]], dtype=torch.float64))
    odds = refusal_log_odds(logprobs, [0, 2])
    assert float(odds[0]) == pytest.approx(0.0, abs=1e-9)  # p(R) = 0.5
    assert float(odds[1]) == pytest.approx(math.log(0.1 / 0.9))


def test_refusal_token_ids_are_the_openings_first_tokens():
    tok = CharTokenizer()
    ids = refusal_token_ids(tok)
    assert ids == sorted({tok(c)["input_ids"][0] for c in "ISAM"})  # I'm/I am/I cannot, Sorry, As an AI, My


def test_eligible_layers_skip_the_embeddings_and_the_last_fifth():
    assert eligible_layers(30, 0.2) == list(range(1, 24))
    assert eligible_layers(3, 0.0) == [1, 2]
    with pytest.raises(SurgeryError, match="skip_last must be in"):
        eligible_layers(30, 1.0)


def test_mean_differences_per_index():
    harmful = {2: torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    harmless = {2: torch.tensor([[0.0, 1.0]])}
    assert mean_differences(harmful, harmless)[2].tolist() == [2.0, 2.0]


def test_score_candidates_on_a_tiny_model():
    model, tok = make_tiny("llama"), CharTokenizer()

    def next_logprobs(prompts):
        return next_token_logprobs(model, tok, prompts, progress=False)

    harmful, harmless = ["how to hurt", "make poison"], ["bake bread", "plant trees", "sing"]
    big = torch.randn(32, generator=torch.Generator().manual_seed(2)) * 5
    directions = {1: torch.zeros(32) + 1e-8, 2: big}
    result = score_candidates(
        model, next_logprobs, directions, harmful, harmless, refusal_token_ids(tok), max_kl=1e9, progress=False
    )
    tiny = result["candidates"]["1"]
    assert abs(tiny["induce"]) < 1e-5  # adding a (near) zero vector changes nothing...
    assert tiny["kl_ablation"] > 0  # ...but ablation is scale-free: it removes the whole component along it
    large = result["candidates"]["2"]
    assert abs(large["induce"]) > 1e-3 and large["kl_ablation"] > 0
    chosen = max(result["candidates"], key=lambda k: result["candidates"][k]["induce"])
    assert result["chosen_layer"] == int(chosen)
    # the KL filter: nothing is eligible below an impossible threshold
    assert (
        score_candidates(model, next_logprobs, {2: big}, harmful, harmless, [2], max_kl=-1.0, progress=False)[
            "chosen_layer"
        ]
        is None
    )


def test_instructions_probe_data_is_chat_formatted_harmful_vs_harmless():
    from helpers import DATA_DIR, tiny_hf_tokenizer

    from surgery_plugin.data.loaders import load_instructions
    from surgery_plugin.pipeline import load_probe_data

    tok = tiny_hf_tokenizer(chat=True)
    data = load_probe_data("instructions", tokenizer=tok, data_dir=DATA_DIR, max_per_class=20, seed=3)
    assert data.labels == [1] * 20 + [0] * 20
    first = load_instructions(DATA_DIR, "harmful_train")[0]
    assert data.texts[0] == f"<|user|>{first}<|end|><|assistant|>"  # a user turn and the generation prompt
    harmless = set(load_instructions(DATA_DIR, "harmless_train"))
    assert all(t.removeprefix("<|user|>").removesuffix("<|end|><|assistant|>") in harmless for t in data.texts[20:])
    again = load_probe_data("instructions", tokenizer=tok, data_dir=DATA_DIR, max_per_class=20, seed=3)
    assert again.texts == data.texts and "seed=3" in data.description and "chat template on" in data.description
    with pytest.raises(SurgeryError, match="'instructions' needs the tokenizer"):
        load_probe_data("instructions", data_dir=DATA_DIR)


# ---------------------------------------------------------------- directional ablation in the weights (abliteration)


@pytest.mark.parametrize("model_type", [t for t in FAMILIES if t not in ("gemma2", "gemma3_text")])
def test_weight_ablation_keeps_the_direction_out_of_everything_the_layers_add(model_type):
    from surgery_plugin.core.edit import revert_edit
    from surgery_plugin.core.steering import apply_ablation

    model = make_tiny(model_type)
    size = architectures.hidden_size(model)
    v = torch.randn(size, generator=torch.Generator().manual_seed(2))
    unit = v / v.norm()
    before = _layer_inputs(model)
    originals = apply_ablation(model, v)
    during = _layer_inputs(model)
    # the residual stream's component along v is the embeddings' at every layer: no layer adds to it
    embedded = during[0] @ unit
    for h in during.values():
        torch.testing.assert_close(h @ unit, embedded, rtol=1e-4, atol=1e-4)
    assert any(not torch.allclose(before[k] @ unit, embedded, atol=1e-3) for k in before if k)  # it did before
    assert len(originals) >= 2 * len(architectures.decoder_layers(model))  # attention and MLP writers, each layer
    revert_edit(model, originals)
    for layer, h in _layer_inputs(model).items():
        torch.testing.assert_close(h, before[layer])


def test_ablation_deltas_are_rank_one_and_orthogonalise():
    from surgery_plugin.core.steering import ablation_deltas

    g = torch.Generator().manual_seed(3)
    w, b, u = torch.randn(6, 4, generator=g), torch.randn(6, generator=g), torch.randn(6, generator=g)
    deltas = ablation_deltas({"w": w, "b": b}, u, conv1d=False)
    unit = u / u.norm()
    assert torch.linalg.matrix_rank(deltas["w"]) == 1
    assert float((unit @ (w + deltas["w"])).abs().max()) < 1e-5 and float(unit @ (b + deltas["b"])) == pytest.approx(
        0, abs=1e-5
    )
    conv = ablation_deltas({"c": w.T.contiguous()}, u, conv1d=True)["c"]
    torch.testing.assert_close(conv, deltas["w"].T)
    with pytest.raises(SurgeryError, match="zero or not finite"):
        ablation_deltas({"w": w}, torch.zeros(6))
