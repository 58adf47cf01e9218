"""The edit variants beyond the paper: mean-difference probes, directions with the benign mean projected out
(at the probe layer, or per layer at the gate input), gate-contrast region scores; and multi-layer features."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny

from surgery_plugin import SurgeryHyperParams, apply_edit, execute_surgery, export_adapter, load_edited
from surgery_plugin.core import architectures
from surgery_plugin.core.features import hidden_features, pooled_states
from surgery_plugin.core.probe import Probe, ProbeTraining, train_probe
from surgery_plugin.core.reference import ReferenceStats, project_out, reference_stats
from surgery_plugin.errors import SurgeryError

TEXTS = [
    "a kind word",
    "have a lovely day",
    "the weather is nice today",
    "you stupid idiot",
    "i hate all of you",
    "zzz",
]


def _probe(model, seed=1):
    v = torch.randn(architectures.hidden_size(model), generator=torch.Generator().manual_seed(seed))
    return Probe(weight=torch.stack([-v, v]), bias=torch.zeros(2))


def test_pooled_states_match_full_forward_hooks(char_tokenizer):
    """Gate inputs from the early-stopping pass equal what the gate modules see in a full forward pass."""
    model = make_tiny("llama")
    hidden, gates = pooled_states(
        model, char_tokenizer, TEXTS, hidden_indices=[1, 3], gate_layers=[0, 2], batch_size=4, progress=False
    )
    seen = {}
    handles = [
        architectures.gate_modules(model)[layer].register_forward_hook(
            lambda _m, args, _out, layer=layer: seen.setdefault(layer, []).append(args[0])
        )
        for layer in (0, 2)
    ]
    try:
        for i, text in enumerate(TEXTS):
            ids = torch.tensor([char_tokenizer(text)["input_ids"]])
            with torch.no_grad():
                full = model(ids, output_hidden_states=True).hidden_states
            for layer in (0, 2):
                torch.testing.assert_close(gates[layer][i], seen[layer][-1][0].mean(0), rtol=1e-5, atol=1e-5)
            for index in (1, 3):
                torch.testing.assert_close(hidden[index][i], full[index][0].mean(0), rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()
    one = hidden_features(model, char_tokenizer, TEXTS, layer=1, batch_size=4, progress=False)
    assert torch.equal(one, hidden[1]), "one layer or several: the same features"


def test_mean_difference_probe_is_the_train_split_mean_difference():
    torch.manual_seed(0)
    features = torch.cat([torch.randn(40, 8) + 2.0, torch.randn(40, 8) - 2.0])
    labels = [1] * 40 + [0] * 40
    probe, metrics = train_probe(features, labels, ProbeTraining(method="mean_difference"), progress=False)
    assert metrics["test_accuracy"] == 1.0 and metrics["n_test"] == 16
    train = [i for i in range(80) if i not in set(_test_indices(labels))]
    undesired = features[[i for i in train if labels[i]]].mean(0)
    acceptable = features[[i for i in train if not labels[i]]].mean(0)
    torch.testing.assert_close(probe.direction, (undesired - acceptable) / 2)
    midpoint = (undesired + acceptable) / 2
    assert probe.score(midpoint[None])[0] == pytest.approx(0.5, abs=1e-5), "the threshold sits halfway"


def _test_indices(labels):
    from surgery_plugin.core.probe import split_indices

    return split_indices(labels, 0.2, 0)[1].tolist()


def test_projected_directions_are_orthogonal_to_the_benign_means(char_tokenizer, tmp_path):
    model = make_tiny("llama")
    probe = _probe(model)
    hp = SurgeryHyperParams(top_k=20, alpha=0.5, normalize=True, probe_project_out="gate_benign_mean", probe_layer=2)
    with pytest.raises(SurgeryError, match="need statistics of benign text"):
        execute_surgery(model, probe, hp)
    stats = reference_stats(model, char_tokenizer, hp, [0, 1, 2], TEXTS[:3], progress=False)
    edit = execute_surgery(model, probe, hp, stats)
    assert edit.layer_directions is not None
    for layer in edit.layers:
        v = edit.direction_of(layer)
        assert abs(float(v @ stats.benign_gate_means[layer])) < 1e-4 * float(stats.benign_gate_means[layer].norm())
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-5)
    # the adapter carries the per-layer directions: same logits as the in-place edit
    ids = torch.tensor([char_tokenizer("the weather is nice")["input_ids"]])
    peft_model = load_edited(model, export_adapter(edit, model, tmp_path / "a", base_model_name="tiny-llama"))
    with torch.no_grad():
        via_adapter = peft_model(ids).logits
    reference = make_tiny("llama")
    apply_edit(reference, edit)
    with torch.no_grad():
        assert (via_adapter - reference(ids).logits).abs().max() <= 1e-5

    at_probe_layer = reference_stats(
        model, char_tokenizer, hp.replace(probe_project_out="benign_mean"), [0, 1, 2], TEXTS[:3], progress=False
    )
    edit = execute_surgery(model, probe, hp.replace(probe_project_out="benign_mean"), at_probe_layer)
    assert edit.layer_directions is None
    assert abs(float(edit.direction @ at_probe_layer.benign_feature_mean)) < 1e-4 * float(
        at_probe_layer.benign_feature_mean.norm()
    )


def test_gate_contrast_scores_rows_against_the_gate_input_contrast(char_tokenizer):
    model = make_tiny("llama")
    hp = SurgeryHyperParams(top_k=10, alpha=0.5, region_scoring="gate_contrast")
    with pytest.raises(SurgeryError, match="undesired texts"):
        reference_stats(model, char_tokenizer, hp, [0, 1, 2], TEXTS[:3], progress=False)
    stats = reference_stats(model, char_tokenizer, hp, [0, 1, 2], TEXTS[:3], TEXTS[3:], progress=False)
    edit = execute_surgery(model, _probe(model), hp, stats)
    scores = []
    for layer in range(3):
        contrast = stats.undesired_gate_means[layer] - stats.benign_gate_means[layer]
        rows = architectures.gate_rows(model, layer).detach()
        cos = (rows @ contrast) / (rows.norm(dim=1) * contrast.norm())
        scores += [(float(-c), layer, row) for row, c in enumerate(cos)]
    best = {(layer, row) for _, layer, row in sorted(scores, key=lambda t: (-t[0], t[1], t[2]))[:10]}
    chosen = {(layer, int(row)) for layer, rows in edit.regions.rows.items() for row in rows}
    assert chosen == best


def test_project_out_and_bad_choices():
    v, b = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])
    assert project_out(v, b).tolist() == [0.0, 1.0]
    assert ReferenceStats().benign_gate_means is None
    for key, value in (("probe_method", "svm"), ("probe_project_out", "all"), ("region_scoring", "random")):
        with pytest.raises(SurgeryError, match=f"{key} must be one of"):
            SurgeryHyperParams(**{key: value})


def test_edit_from_hparams_contrasts_with_the_probe_data_it_is_given_or_loads(char_tokenizer, data_dir):
    """gate_contrast reads the probe data's undesired texts: the ones passed in, else hparams.probe_data's."""
    from surgery_plugin.core.probe import BehaviorData
    from surgery_plugin.data.probe_data import load_behavior_data
    from surgery_plugin.pipeline import edit_from_hparams

    model = make_tiny("llama")
    hp = SurgeryHyperParams(
        top_k=10, alpha=0.5, region_scoring="gate_contrast", probe_data="davidson", probe_max_per_class=8
    )
    loaded = edit_from_hparams(model, char_tokenizer, _probe(model), hp, data_dir, progress=False)
    given = edit_from_hparams(
        model,
        char_tokenizer,
        _probe(model),
        hp,
        data_dir,
        load_behavior_data("davidson", data_dir, 8, hp.seed),
        progress=False,
    )

    def chosen(edit):
        return {(layer, int(row)) for layer, rows in edit.regions.rows.items() for row in rows}

    assert chosen(loaded) == chosen(given)
    other = edit_from_hparams(
        model, char_tokenizer, _probe(model), hp, data_dir, BehaviorData(TEXTS[3:4], [1], "one text"), progress=False
    )
    assert chosen(other) != chosen(given)
    with pytest.raises(SurgeryError, match="set probe_data"):
        edit_from_hparams(model, char_tokenizer, _probe(model), hp.replace(probe_data=None), data_dir, progress=False)
