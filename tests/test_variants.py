"""The edit variants beyond the paper: mean-difference probes, directions with the benign mean projected out
(at the probe layer, or per layer at the gate input), gate-contrast region scores; multi-layer features; and the
pipeline that builds them from hparams (build_edit, EditCache)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny

from surgery_plugin import SurgeryHyperParams, apply_edit, execute_surgery, export_adapter, load_edited
from surgery_plugin import pipeline as pipeline_module
from surgery_plugin.core import architectures
from surgery_plugin.core.features import hidden_features, pooled_states
from surgery_plugin.core.probe import BehaviorData, Probe, ProbeTraining, train_probe
from surgery_plugin.core.reference import ReferenceStats, project_out, reference_needs, reference_stats
from surgery_plugin.core.statistics import stratified_split
from surgery_plugin.errors import SurgeryError
from surgery_plugin.pipeline import EditCache, build_edit

TEXTS = [
    "a kind word",
    "have a lovely day",
    "the weather is nice today",
    "you stupid idiot",
    "i hate all of you",
    "zzz",
]
BENIGN, UNDESIRED = TEXTS[:3], TEXTS[3:]


def _probe(model, seed=1):
    v = torch.randn(architectures.hidden_size(model), generator=torch.Generator().manual_seed(seed))
    return Probe(weight=torch.stack([-v, v]), bias=torch.zeros(2))


def _chosen(edit) -> set[tuple[int, int]]:
    return {(layer, int(row)) for layer, rows in edit.regions.rows.items() for row in rows}


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


# ---------------------------------------------------------------------------- features of several layers


@pytest.fixture(scope="module")
def several(model):
    from helpers import CharTokenizer

    return pooled_states(
        model, CharTokenizer(), TEXTS, hidden_indices=[1, 3], gate_layers=[0, 2], batch_size=4, progress=False
    )


def test_pooled_gate_inputs_are_what_the_gates_see_in_a_full_forward_pass(model, char_tokenizer, several):
    _, gates = several
    seen = {}
    handles = [
        architectures.gate_modules(model)[layer].register_forward_hook(
            lambda _m, args, _out, layer=layer: seen.__setitem__(layer, args[0])
        )
        for layer in (0, 2)
    ]
    try:
        for i, text in enumerate(TEXTS):
            with torch.no_grad():
                model(torch.tensor([char_tokenizer(text)["input_ids"]]))
            for layer in (0, 2):
                torch.testing.assert_close(gates[layer][i], seen[layer][0].mean(0), rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_pooled_hidden_states_are_the_full_forward_passes(model, char_tokenizer, several):
    hidden, _ = several
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            full = model(torch.tensor([char_tokenizer(text)["input_ids"]]), output_hidden_states=True).hidden_states
        for index in (1, 3):
            torch.testing.assert_close(hidden[index][i], full[index][0].mean(0), rtol=1e-5, atol=1e-5)


def test_one_layer_or_several_give_the_same_features(model, char_tokenizer, several):
    one = hidden_features(model, char_tokenizer, TEXTS, layer=1, batch_size=4, progress=False)
    assert torch.equal(one, several[0][1])


# ---------------------------------------------------------------------------- mean-difference probe


def test_mean_difference_probe_is_the_train_split_mean_difference():
    torch.manual_seed(0)
    features = torch.cat([torch.randn(40, 8) + 2.0, torch.randn(40, 8) - 2.0])
    labels = [1] * 40 + [0] * 40
    probe, metrics = train_probe(features, labels, ProbeTraining(method="mean_difference"), progress=False)
    assert metrics["test_accuracy"] == 1.0 and metrics["n_test"] == 16
    train = stratified_split(labels, 0.2, 0)[0].tolist()  # the probe's own held-out split is not used
    undesired = features[[i for i in train if labels[i]]].mean(0)
    acceptable = features[[i for i in train if not labels[i]]].mean(0)
    torch.testing.assert_close(probe.direction, (undesired - acceptable) / 2)
    midpoint = (undesired + acceptable) / 2
    assert probe.score(midpoint[None])[0] == pytest.approx(0.5, abs=1e-5), "the threshold sits halfway"


# ---------------------------------------------------------------------------- reference statistics (pure)


def test_reference_stats_are_means_over_texts():
    hidden = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    benign = {0: torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]), 2: torch.tensor([[1.0, 1.0]])}
    undesired = {0: torch.tensor([[-1.0, 0.0], [1.0, 2.0]]), 2: torch.tensor([[7.0, 9.0], [9.0, 7.0]])}
    stats = reference_stats(hidden, benign, undesired, "hand")
    assert stats.benign_feature_mean.tolist() == [2.0, 4.0]
    assert {k: v.tolist() for k, v in stats.benign_gate_means.items()} == {0: [2.0, 3.0], 2: [1.0, 1.0]}
    assert {k: v.tolist() for k, v in stats.undesired_gate_means.items()} == {0: [0.0, 1.0], 2: [8.0, 8.0]}
    assert stats.description == "hand"


def test_reference_stats_of_nothing_are_none():
    stats = reference_stats(None, None, None, "")
    assert stats == ReferenceStats()
    assert (stats.benign_feature_mean, stats.benign_gate_means, stats.undesired_gate_means) == (None, None, None)


def test_reference_stats_refuse_undesired_without_benign_gates():
    with pytest.raises(SurgeryError, match="the gate-input contrast needs the benign gate inputs"):
        reference_stats(None, None, {0: torch.ones(2, 2)}, "")


@pytest.mark.parametrize(
    "changes, needs",
    [
        ({}, (False, False, False, False)),
        ({"probe_project_out": "benign_mean"}, (True, False, False, False)),
        ({"probe_project_out": "gate_benign_mean"}, (False, True, False, False)),
        ({"region_scoring": "gate_contrast"}, (False, True, True, False)),
        ({"probe_project_out": "benign_mean", "region_scoring": "gate_contrast"}, (True, True, True, False)),
        ({"edit_direction": "gate_mean_difference"}, (False, True, True, False)),
        ({"region_scoring": "activation"}, (False, False, False, True)),
    ],
)
def test_reference_needs(changes, needs):
    got = reference_needs(SurgeryHyperParams(**changes))
    assert (got.benign_hidden, got.benign_gates, got.undesired_gates, got.sensitivities) == needs
    assert got.any == any(needs) == SurgeryHyperParams(**changes).needs_reference_stats()
    assert got.undesired_texts == (needs[2] or needs[3])


def test_project_out_removes_the_component_along_the_basis():
    v, b = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])
    assert project_out(v, b).tolist() == [0.0, 1.0]
    assert project_out(v, torch.zeros(2)).tolist() == [1.0, 1.0], "a zero basis removes nothing"


@pytest.mark.parametrize(
    "key, value",
    [("probe_method", "svm"), ("probe_project_out", "all"), ("region_scoring", "random"), ("edit_direction", "up")],
)
def test_bad_variant_choices(key, value):
    with pytest.raises(SurgeryError, match=f"{key} must be one of"):
        SurgeryHyperParams(**{key: value})


# ---------------------------------------------------------------------------- the variants' edits


@pytest.fixture(scope="module")
def benign_and_undesired(model):
    from helpers import CharTokenizer

    tok = CharTokenizer()
    benign_hidden, benign_gates = pooled_states(model, tok, BENIGN, [2], [0, 1, 2], progress=False)
    _, undesired_gates = pooled_states(model, tok, UNDESIRED, (), [0, 1, 2], progress=False)
    return benign_hidden[2], benign_gates, undesired_gates


GATE_BENIGN = SurgeryHyperParams(
    top_k=20, alpha=0.5, normalize=True, probe_project_out="gate_benign_mean", probe_layer=2
)


def test_variants_without_statistics_are_refused(model):
    with pytest.raises(SurgeryError, match="need statistics of benign text"):
        execute_surgery(model, _probe(model), GATE_BENIGN)


def test_per_layer_directions_are_orthogonal_to_the_benign_gate_means(model, benign_and_undesired):
    _, benign_gates, _ = benign_and_undesired
    stats = reference_stats(None, benign_gates, None, "benign")
    edit = execute_surgery(model, _probe(model), GATE_BENIGN, stats)
    assert edit.layer_directions is not None and set(edit.layer_directions) == set(edit.layers)
    for layer in edit.layers:
        v, mean = edit.direction_of(layer), benign_gates[layer].mean(0)
        assert abs(float(v @ mean)) < 1e-4 * float(mean.norm())
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-5), "normalised: unit length per layer too"


def test_the_adapter_carries_the_per_layer_directions(model, benign_and_undesired, char_tokenizer, tmp_path):
    stats = reference_stats(None, benign_and_undesired[1], None, "benign")
    edit = execute_surgery(model, _probe(model), GATE_BENIGN, stats)
    ids = torch.tensor([char_tokenizer("the weather is nice")["input_ids"]])
    adapter = export_adapter(edit, model, tmp_path / "a", base_model_name="tiny-llama")
    peft_model = load_edited(make_tiny("llama"), adapter)  # PEFT wraps its model's modules: not the shared one
    with torch.no_grad():
        via_adapter = peft_model(ids).logits
    reference = make_tiny("llama")
    apply_edit(reference, edit)
    with torch.no_grad():
        assert (via_adapter - reference(ids).logits).abs().max() <= 1e-5


def test_benign_mean_projects_the_shared_direction_at_the_probe_layer(model, benign_and_undesired):
    benign_hidden = benign_and_undesired[0]
    stats = reference_stats(benign_hidden, None, None, "benign")
    edit = execute_surgery(model, _probe(model), GATE_BENIGN.replace(probe_project_out="benign_mean"), stats)
    assert edit.layer_directions is None
    mean = benign_hidden.mean(0)
    assert abs(float(edit.direction @ mean)) < 1e-4 * float(mean.norm())


def test_gate_contrast_scores_rows_against_the_gate_input_contrast(model, benign_and_undesired):
    _, benign_gates, undesired_gates = benign_and_undesired
    hp = SurgeryHyperParams(top_k=10, alpha=0.5, region_scoring="gate_contrast")
    edit = execute_surgery(model, _probe(model), hp, reference_stats(None, benign_gates, undesired_gates, ""))
    scores = []
    for layer in range(3):
        contrast = undesired_gates[layer].mean(0) - benign_gates[layer].mean(0)
        rows = model.model.layers[layer].mlp.gate_proj.weight.detach()
        cos = (rows @ contrast) / (rows.norm(dim=1) * contrast.norm())
        scores += [(float(-c), layer, row) for row, c in enumerate(cos)]
    best = {(layer, row) for _, layer, row in sorted(scores, key=lambda t: (-t[0], t[1], t[2]))[:10]}
    assert _chosen(edit) == best


def test_gate_mean_difference_edit_on_hand_made_weights():
    """Rows scored against, and moved along, each layer's gate-input contrast at the probe's length."""
    model = make_tiny("llama")  # hidden 32, 48 gate rows, 3 layers: the weights are replaced by hand
    hidden = 32
    contrast = {0: torch.zeros(hidden), 1: torch.zeros(hidden), 2: torch.zeros(hidden)}
    contrast[0][0], contrast[1][1], contrast[2][2] = 2.0, 3.0, 4.0  # layer l's contrast: e_l, of lengths 2, 3, 4
    with torch.no_grad():
        for layer in range(3):
            gate = model.model.layers[layer].mlp.gate_proj.weight
            gate.copy_(torch.eye(48, hidden) * 0.01 + 0.001)  # nearly orthogonal to every contrast...
            gate[5 + layer, layer] = -1.0  # ...but for one row per layer, opposite to its contrast
    benign = {layer: torch.zeros(4, hidden) for layer in range(3)}
    undesired = {layer: contrast[layer].expand(4, hidden).clone() for layer in range(3)}
    stats = reference_stats(None, benign, undesired, "hand")
    probe = Probe(weight=torch.stack([-torch.ones(hidden), torch.ones(hidden)]) * 0.5, bias=torch.zeros(2))
    hp = SurgeryHyperParams(top_k=3, alpha=0.25, normalize=False, edit_direction="gate_mean_difference")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    edit = execute_surgery(model, probe, hp, stats)
    assert _chosen(edit) == {(0, 5), (1, 6), (2, 7)}  # the rows opposite their own layer's contrast
    probe_norm = float(probe.direction.norm())
    for layer in range(3):  # the vector: that contrast, at the probe's length
        want = torch.zeros(hidden)
        want[layer] = probe_norm
        torch.testing.assert_close(edit.direction_of(layer), want)
    apply_edit(model, edit, return_orig_weights=False)
    for layer in range(3):
        name = f"model.layers.{layer}.mlp.gate_proj.weight"
        delta = dict(model.named_parameters())[name].detach() - before[name]
        expected = torch.zeros(48, hidden)
        expected[5 + layer, layer] = 0.25 * probe_norm  # step alpha (raw) times the vector
        torch.testing.assert_close(delta, expected)
    assert edit.metadata["edit_direction"] == "gate_mean_difference"


def test_gate_mean_difference_refuses_a_projection_and_statistics_less_use(model):
    with pytest.raises(SurgeryError, match="probe_project_out: benign_mean has nothing to act on"):
        SurgeryHyperParams(edit_direction="gate_mean_difference", probe_project_out="benign_mean")
    with pytest.raises(SurgeryError, match="edit_direction: gate_mean_difference need statistics of benign text"):
        execute_surgery(model, _probe(model), SurgeryHyperParams(edit_direction="gate_mean_difference"))


# ---------------------------------------------------------------------------- build_edit and its cache


@pytest.fixture
def probe_csv(tmp_path):
    rows = [(f"have a lovely day number {i}", 0) for i in range(20)] + [
        (f"you idiot number {i}", 1) for i in range(20)
    ]
    path = tmp_path / "probe.csv"
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return str(path)


@pytest.fixture
def spies(monkeypatch):
    """Benign reference texts from this file (no shared data), and counters of probe-data loads and forward passes."""
    calls = {"load_probe_data": 0, "pooled_states": []}
    load, pooled = pipeline_module.load_probe_data, pipeline_module.pooled_states

    def counted_load(*args, **kwargs):
        calls["load_probe_data"] += 1
        return load(*args, **kwargs)

    def counted_pooled(model, tokenizer, texts, *args, **kwargs):
        calls["pooled_states"].append(len(texts))
        return pooled(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(
        pipeline_module, "benign_reference_texts", lambda _data_dir=None: (list(BENIGN), "hand benign")
    )
    monkeypatch.setattr(pipeline_module, "load_probe_data", counted_load)
    monkeypatch.setattr(pipeline_module, "pooled_states", counted_pooled)
    return calls


CONTRAST = SurgeryHyperParams(top_k=10, alpha=0.5, region_scoring="gate_contrast", max_length=48)


@pytest.mark.parametrize(
    "changes, loads",
    [
        ({"region_scoring": "cosine"}, 0),
        ({"region_scoring": "cosine", "probe_project_out": "benign_mean"}, 0),
        ({"region_scoring": "cosine", "probe_project_out": "gate_benign_mean"}, 0),
        ({}, 1),
    ],
)
def test_build_edit_with_a_probe_loads_probe_data_only_for_gate_contrast(
    model, char_tokenizer, probe_csv, spies, changes, loads
):
    hp = CONTRAST.replace(probe_data=probe_csv, **changes)
    built = build_edit(model, char_tokenizer, hp, probe=_probe(model), progress=False)
    assert spies["load_probe_data"] == loads
    assert (built.data is not None) == bool(loads)
    if loads:
        assert built.data.labels.count(1) == 20


def test_build_edit_gate_contrast_is_the_pure_edit_on_the_same_texts(model, char_tokenizer, probe_csv, spies):
    """build_edit = pooled states of the benign reference texts and the probe data's undesired texts, their
    means, then execute_surgery."""
    hp = CONTRAST.replace(probe_data=probe_csv)
    built = build_edit(model, char_tokenizer, hp, probe=_probe(model), progress=False)
    undesired = [f"you idiot number {i}" for i in range(20)]
    _, benign_gates = pooled_states(model, char_tokenizer, BENIGN, (), [0, 1, 2], max_length=48, progress=False)
    _, undesired_gates = pooled_states(model, char_tokenizer, undesired, (), [0, 1, 2], max_length=48, progress=False)
    want = execute_surgery(model, _probe(model), hp, reference_stats(None, benign_gates, undesired_gates, ""))
    assert _chosen(built.edit) == _chosen(want)
    assert built.edit.metadata["reference_stats"] == "benign hand benign n=3, undesired n=20"


def test_build_edit_contrasts_with_the_data_it_is_given(model, char_tokenizer, probe_csv, spies):
    hp = CONTRAST.replace(probe_data=probe_csv)
    loaded = build_edit(model, char_tokenizer, hp, probe=_probe(model), progress=False)
    given = build_edit(
        model, char_tokenizer, hp.replace(probe_data=None), loaded.data, probe=_probe(model), progress=False
    )
    assert _chosen(given.edit) == _chosen(loaded.edit)
    other = build_edit(
        model, char_tokenizer, hp, BehaviorData(UNDESIRED[:1], [1], "one text"), probe=_probe(model), progress=False
    )
    assert spies["load_probe_data"] == 1, "given data is used instead of hparams.probe_data"
    assert _chosen(other.edit) != _chosen(given.edit)


def test_build_edit_activation_scoring_end_to_end(model, char_tokenizer, probe_csv, spies):
    """Sensitivities of the probe data's undesired texts and of the benign reference, computed once per text set."""
    hp = SurgeryHyperParams(
        top_k=10, alpha=0.5, normalize=True, region_scoring="activation", probe_data=probe_csv, max_length=48
    )
    cache = EditCache()
    built = build_edit(model, char_tokenizer, hp, cache=cache, progress=False)
    assert built.edit.regions.num_rows == 10 and built.edit.metadata["region_scoring"] == "activation"
    assert "undesired n=20" in built.edit.metadata["reference_stats"]
    again = build_edit(model, char_tokenizer, hp.replace(alpha=0.25), cache=cache, progress=False)
    assert _chosen(again.edit) == _chosen(built.edit)  # same statistics from the cache, alpha does not pick rows


def test_build_edit_gate_contrast_without_probe_data_is_refused(model, char_tokenizer, spies):
    with pytest.raises(SurgeryError, match="region_scoring: gate_contrast need the probe's data: set probe_data"):
        build_edit(model, char_tokenizer, CONTRAST.replace(probe_data=None), probe=_probe(model), progress=False)


def test_edit_cache_computes_each_text_sets_pooled_states_once(model, char_tokenizer, probe_csv, spies):
    cache = EditCache()
    hp = CONTRAST.replace(probe_data=probe_csv, probe_layer=2, probe_epochs=2)
    first = build_edit(model, char_tokenizer, hp, cache=cache, progress=False)
    # probe texts at the probe layer, benign and undesired texts at each gate: one pass per text set
    assert sorted(spies["pooled_states"]) == [3, 20, 40]
    assert (cache.hits, cache.misses) == (0, 1 + 3 + 3)
    second = build_edit(model, char_tokenizer, hp.replace(alpha=-1.0, top_k=5), cache=cache, progress=False)
    assert len(spies["pooled_states"]) == 3, "no forward pass for a second edit of the same model"
    assert (cache.hits, cache.misses) == (6, 7), "the probe is memoised; the gate statistics hit"
    assert spies["load_probe_data"] == 1
    assert torch.equal(first.probe.weight, second.probe.weight)


def test_edit_cache_is_keyed_by_the_weights_it_is_given(model, char_tokenizer, spies):
    from surgery_plugin.core.provenance import model_fingerprint

    cache = EditCache(fingerprint=model_fingerprint)
    hp = SurgeryHyperParams(probe_layer=2, max_length=48)
    cache.pooled(model, char_tokenizer, BENIGN, hp, [2], (), progress=False)
    cache.pooled(model, char_tokenizer, BENIGN, hp, [2], (), progress=False)
    assert (cache.hits, cache.misses) == (1, 1)
    other = make_tiny("llama", seed=5)
    cache.pooled(other, char_tokenizer, BENIGN, hp, [2], (), progress=False)
    assert (cache.hits, cache.misses) == (1, 2), "other weights: another entry"
    assert len(spies["pooled_states"]) == 2


def test_edit_cache_drops_the_least_recently_used_entries(model, char_tokenizer, spies):
    cache = EditCache(max_entries=2)
    hp = SurgeryHyperParams(max_length=48)
    for texts in (BENIGN, UNDESIRED, BENIGN, TEXTS):  # BENIGN used again: UNDESIRED is the oldest
        cache.pooled(model, char_tokenizer, texts, hp, (), [0], progress=False)
    assert (cache.hits, cache.misses) == (1, 3)
    cache.pooled(model, char_tokenizer, BENIGN, hp, (), [0], progress=False)
    cache.pooled(model, char_tokenizer, UNDESIRED, hp, (), [0], progress=False)
    assert (cache.hits, cache.misses) == (2, 4)


def test_build_edit_contrasts_with_the_loaded_or_given_shared_data(model, char_tokenizer, data_dir):
    """The shared davidson data and RTP benign texts: hparams.probe_data's undesired texts, loaded or given."""
    from surgery_plugin.data.probe_data import load_behavior_data

    hp = CONTRAST.replace(probe_data="davidson", probe_max_per_class=8)
    loaded = build_edit(model, char_tokenizer, hp, probe=_probe(model), data_dir=data_dir, progress=False)
    data = load_behavior_data("davidson", data_dir, 8, hp.seed)
    given = build_edit(model, char_tokenizer, hp, data, probe=_probe(model), data_dir=data_dir, progress=False)
    assert loaded.data == data and _chosen(loaded.edit) == _chosen(given.edit)
    assert "rtp nontoxic[400:600]" in loaded.edit.metadata["reference_stats"]
