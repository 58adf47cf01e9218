import pytest
import torch

from surgery_plugin import SurgeryError
from surgery_plugin.core.regions import RunningTopK, gate_row_scores, layer_range, resolve_k, select_top_k


def test_scores_are_negative_cosine():
    rows = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    scores = gate_row_scores(rows, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(scores, torch.tensor([-1.0, 1.0, 0.0, -(2**-0.5)]))


def test_global_top_k_across_layers():
    scores = {0: torch.tensor([0.9, 0.1, 0.5]), 1: torch.tensor([0.8, 0.95, 0.2])}
    sel = select_top_k(scores, 3)
    assert {layer: r.tolist() for layer, r in sel.rows.items()} == {0: [0], 1: [0, 1]}
    assert sel.num_rows == 3
    assert sel.row_mask(1).tolist() == [True, True, False]


def test_per_layer_cap():
    scores = {0: torch.tensor([0.9, 0.8, 0.7]), 1: torch.tensor([0.1, 0.2, 0.3])}
    sel = select_top_k(scores, 3, max_rows_per_layer=2)
    assert sel.counts() == {0: 2, 1: 1}
    assert sel.rows[1].tolist() == [2]


def test_ties_break_by_layer_then_row():
    scores = {0: torch.zeros(4), 1: torch.zeros(4)}
    sel = select_top_k(scores, 3)
    assert {layer: r.tolist() for layer, r in sel.rows.items()} == {0: [0, 1, 2]}


def test_k_as_count_or_fraction():
    assert resolve_k(0.0465, 352256) == 16380
    assert resolve_k(16384, 352256) == 16384
    assert resolve_k(16384.0, 352256) == 16384
    for bad in (0, -3, 1.5, 10**9, "10", True):
        with pytest.raises(SurgeryError):
            resolve_k(bad, 352256)


def test_layer_range_slices_and_rejects_empty():
    assert layer_range(10, [3, 6]) == [3, 4, 5]
    assert layer_range(10, [-2, 10]) == [8, 9]
    with pytest.raises(SurgeryError, match="selects no layer"):
        layer_range(10, [7, 3])


@pytest.mark.parametrize("cap", [None, 3])
def test_running_top_k_is_the_top_k_of_all_scores_in_any_layer_order(cap):
    """The one selection both the in-memory and the streaming edit use, against sorting everything."""
    generator = torch.Generator().manual_seed(0)
    scores = {layer: torch.randint(0, 4, (9,), generator=generator).float() for layer in range(6)}  # many ties
    ranked = sorted(
        (-float(s), layer, row)
        for layer, layer_scores in scores.items()
        for row, s in enumerate(layer_scores)
        if cap is None or row in torch.sort(layer_scores, descending=True, stable=True).indices[:cap].tolist()
    )
    want: dict[int, list[int]] = {}
    for _, layer, row in ranked[:11]:
        want.setdefault(layer, []).append(row)
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
        top = RunningTopK(11, 9, cap)
        for layer in order:
            top.add(layer, scores[layer])
        got = {layer: rows.tolist() for layer, rows in top.selection().rows.items()}
        assert got == {layer: sorted(rows) for layer, rows in want.items()}
    assert {layer: r.tolist() for layer, r in select_top_k(scores, 11, cap).rows.items()} == got
