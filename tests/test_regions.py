import pytest
import torch
from helpers import make_tiny

from surgery_plugin import SurgeryError
from surgery_plugin.core import architectures
from surgery_plugin.core.regions import RunningTopK, layer_range, resolve_k, score_row_blocks, select_regions


def _rows(sel) -> dict[int, list[int]]:
    return {layer: r.tolist() for layer, r in sel.rows.items()}


def _top(scores: dict[int, torch.Tensor], k: int, cap: int | None = None):
    top = RunningTopK(k, len(next(iter(scores.values()))), cap)
    for layer, layer_scores in scores.items():
        top.add(layer, layer_scores)
    return top.selection()


def test_scores_are_negative_cosine_and_norms_the_row_lengths():
    rows = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    scores, norms = score_row_blocks([rows[:3], rows[3:]], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(scores, torch.tensor([-1.0, 1.0, 0.0, -(2**-0.5)]))
    torch.testing.assert_close(norms, torch.tensor([1.0, 2.0, 3.0, 2**0.5]))


def test_scores_of_half_precision_rows_are_computed_in_float32():
    rows = torch.tensor([[3.0, 4.0], [-1.0, 0.0]], dtype=torch.bfloat16)
    scores, norms = score_row_blocks([rows], torch.tensor([1.0, 0.0]))
    assert scores.dtype == norms.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([-0.6, 1.0]))
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0]))


def test_global_top_k_across_layers():
    sel = _top({0: torch.tensor([0.9, 0.1, 0.5]), 1: torch.tensor([0.8, 0.95, 0.2])}, 3)
    assert _rows(sel) == {0: [0], 1: [0, 1]}
    assert sel.num_rows == 3
    assert sel.row_mask(1).tolist() == [True, True, False]
    assert sel.row_mask(2).tolist() == [False, False, False]


def test_per_layer_cap():
    sel = _top({0: torch.tensor([0.9, 0.8, 0.7]), 1: torch.tensor([0.1, 0.2, 0.3])}, 3, cap=2)
    assert sel.counts() == {0: 2, 1: 1}
    assert sel.rows[1].tolist() == [2]


def test_ties_break_by_layer_then_row():
    assert _rows(_top({0: torch.zeros(4), 1: torch.zeros(4)}, 3)) == {0: [0, 1, 2]}
    assert _rows(_top({1: torch.zeros(4), 0: torch.zeros(4)}, 3)) == {0: [0, 1, 2]}, "layer order does not matter"


def test_running_top_k_refuses_a_layer_twice_or_of_another_width():
    top = RunningTopK(2, 3)
    top.add(0, torch.zeros(3))
    with pytest.raises(SurgeryError, match="layer 0 was scored twice"):
        top.add(0, torch.zeros(3))
    with pytest.raises(SurgeryError, match="layer 1 has 4 gate rows, expected 3"):
        top.add(1, torch.zeros(4))


def test_too_few_candidates_is_infeasible():
    with pytest.raises(SurgeryError, match="top_k 5 exceeds the 4 candidate rows"):
        _top({0: torch.zeros(3), 1: torch.zeros(3)}, 5, cap=2)
    with pytest.raises(SurgeryError, match="no layers"):
        RunningTopK(1, 3).selection()


def test_k_as_count_or_fraction():
    assert resolve_k(0.0465, 352256) == 16380
    assert resolve_k(16384, 352256) == 16384
    assert resolve_k(16384.0, 352256) == 16384
    assert resolve_k(1e-9, 100) == 1, "a positive fraction selects at least one row"


@pytest.mark.parametrize("bad", [0, -3, 1.5, 10**9, "10", True])
def test_bad_k_is_refused(bad):
    with pytest.raises(SurgeryError, match="top_k"):
        resolve_k(bad, 352256)


def test_layer_range_slices_and_rejects_empty():
    assert layer_range(10, None) == list(range(10))
    assert layer_range(10, [3, 6]) == [3, 4, 5]
    assert layer_range(10, [-2, 10]) == [8, 9]
    with pytest.raises(SurgeryError, match="selects no layer"):
        layer_range(10, [7, 3])


@pytest.mark.parametrize("cap", [None, 3])
def test_running_top_k_is_the_top_k_of_all_scores_in_any_layer_order(cap):
    """The one selection both the in-memory and the streaming edit use, against sorting everything."""
    generator = torch.Generator().manual_seed(0)
    scores = {layer: torch.randint(0, 4, (9,), generator=generator).float() for layer in range(6)}  # many ties
    ranked = []
    for layer, layer_scores in scores.items():
        # the cap keeps a layer's best rows, ties by lower row: sort (-score, row) by hand
        candidates = sorted((-float(s), row) for row, s in enumerate(layer_scores))[: cap or len(layer_scores)]
        ranked += [(score, layer, row) for score, row in candidates]
    want: dict[int, list[int]] = {}
    for _, layer, row in sorted(ranked)[:11]:
        want.setdefault(layer, []).append(row)
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
        got = _rows(_top({layer: scores[layer] for layer in order}, 11, cap))
        assert got == {layer: sorted(rows) for layer, rows in want.items()}, order


@pytest.fixture
def known_gates():
    """A tiny llama whose gate rows are e_1 (score 0 against e_0) except five rows with known scores."""
    model = make_tiny("llama")
    gates = architectures.gate_modules(model)
    with torch.no_grad():
        for gate in gates:
            gate.weight.zero_()
            gate.weight[:, 1] = 1.0
        for layer, row, value in ((0, 5, [-1.0, 0.0]), (2, 7, [-3.0, 0.0]), (2, 40, [-0.5, 0.0])):
            gates[layer].weight[row, :2] = torch.tensor(value)  # -cos = 1
        gates[1].weight[3, :2] = torch.tensor([-1.0, 1.0])  # -cos = 1/sqrt(2)
        gates[0].weight[9, :2] = torch.tensor([-1.0, 2.0])  # -cos = 1/sqrt(5)
    direction = torch.zeros(architectures.hidden_size(model))
    direction[0] = 2.0
    return model, direction


@pytest.mark.parametrize(
    "top_k, cap, layers, want",
    [
        (3, None, None, {0: [5], 2: [7, 40]}),
        (4, None, None, {0: [5], 1: [3], 2: [7, 40]}),
        (5, None, None, {0: [5, 9], 1: [3], 2: [7, 40]}),
        (3, 1, None, {0: [5], 1: [3], 2: [7]}),
        (2, None, [1, 3], {2: [7, 40]}),
        (3, None, [0, 2], {0: [5, 9], 1: [3]}),
        (3 / 144, None, None, {0: [5], 2: [7, 40]}),  # a fraction of the 3 x 48 rows
    ],
)
def test_select_regions_on_hand_made_gates(known_gates, top_k, cap, layers, want):
    model, direction = known_gates
    assert _rows(select_regions(model, direction, top_k, cap, layers)) == want
