"""The package's statistics where the answer is known: simulated data, exact formulas, hand-made runs."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from helpers import paired_eval

from surgery_plugin.core.statistics import mcnemar_exact, paired_bootstrap, wilson_interval
from surgery_plugin.evaluation.paired import paired_changes, paired_table


def test_the_paired_bootstrap_covers_the_true_change_about_95_percent_of_the_time():
    """400 simulated paired studies (n = 120 prompts; a prompt is toxic before with p 0.3 and flips to clean with
    p 0.4, clean to toxic with p 0.05): the true change is 0.3 * -0.4 + 0.7 * 0.05 = -0.085."""
    rng = np.random.default_rng(0)
    truth, covered = 0.3 * -0.4 + 0.7 * 0.05, 0
    for study in range(400):
        before = rng.random(120) < 0.3
        flip = np.where(before, rng.random(120) < 0.4, rng.random(120) < 0.05)
        after = before ^ flip
        _, low, high = paired_bootstrap(before.astype(float), after.astype(float), n_boot=1000, seed=study)
        covered += low <= truth <= high
    assert 0.91 <= covered / 400 <= 0.985, covered


def test_the_paired_bootstrap_is_narrower_than_the_unpaired_interval_when_arms_are_correlated():
    rng = np.random.default_rng(1)
    before = rng.normal(0.5, 0.2, 300)
    after = before - 0.02 + rng.normal(0, 0.02, 300)
    change, low, high = paired_bootstrap(before, after, seed=0)
    unpaired_half = 1.96 * math.sqrt(before.var(ddof=1) / 300 + after.var(ddof=1) / 300)
    assert change == pytest.approx(after.mean() - before.mean())
    assert low < change < high and (high - low) / 2 < unpaired_half / 5


def test_the_paired_bootstrap_leaves_out_items_missing_in_either_arm():
    change, _, _ = paired_bootstrap([0.0, float("nan"), 1.0], [1.0, 5.0, float("nan")], seed=0)
    assert change == 1.0


@pytest.mark.parametrize("gained, lost", [(5, 15), (0, 7), (10, 10), (0, 0), (31, 46)])
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs(gained, lost):
    before = [False] * gained + [True] * lost + [True, False] * 20  # 20 concordant of each kind
    after = [True] * gained + [False] * lost + [True, False] * 20
    n, k = gained + lost, min(gained, lost)
    expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    assert mcnemar_exact(before, after) == (gained, lost, pytest.approx(expected))


def test_mcnemar_matches_scipy_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    before = [True] * 15 + [False] * 5 + [False] * 30
    after = [False] * 15 + [True] * 5 + [False] * 30
    assert mcnemar_exact(before, after)[2] == pytest.approx(stats.binomtest(5, 20, 0.5).pvalue)


@pytest.mark.parametrize("k, n", [(0, 11), (6, 6), (3, 10), (0, 1)])
def test_the_wilson_interval_always_holds_the_rate(k, n):
    low, high = wilson_interval(k, n)
    assert 0 <= low <= k / n <= high <= 1


def _rows(suite, scores, refused=None):
    rows = []
    for i, s in enumerate(scores):
        row = {"suite": suite, "prompt": f"p{i}", "completion": "c", "scores": {"j": s}, "decoding": "greedy"}
        if refused is not None:
            row["refused"] = refused[i]
        rows.append(row)
    return rows


def test_paired_changes_count_the_prompts_that_changed_side():
    before = _rows("rtp", [0.9, 0.9, 0.1, 0.1, 0.6]) + [{"suite": "kl", "prompt": "x", "kl": 0.1}]
    after = _rows("rtp", [0.1, 0.9, 0.1, 0.8, None])
    paired = paired_changes(before, after, n_boot=200)
    toxic = paired["suites"]["rtp"]["outcomes"]["toxic/j"]
    assert (toxic["n"], toxic["before"], toxic["after"]) == (4, 0.5, 0.5)  # the missing score is left out
    assert (toxic["became_flagged"], toxic["became_clean"], toxic["change"]) == (1, 1, 0.0)
    scores = paired["suites"]["rtp"]["mean_scores"]["j"]
    assert scores["change"] == pytest.approx(((0.1 - 0.9) + 0 + 0 + (0.8 - 0.1)) / 4)
    assert "kl" not in paired["suites"]
    assert "| rtp | toxic/j | 4 | 0.500 | 0.500 |" in paired_table(paired)


def test_paired_changes_order_suites_and_judges_the_same_whatever_the_hash_seed():
    # set intersections iterate in hash order, which changes with PYTHONHASHSEED: the JSON must not
    judges = ["profanity", "minilm", "minilm:perspective", "detoxify", "refusal", "vader"]
    suites = ["toxigen", "rtp", "safeedit", "advbench", "attitude", "false_refusal"]
    rows = []
    for suite in suites:
        for i in range(3):
            scores = {j: 0.1 * (i + k) for k, j in enumerate(judges)}
            rows.append({"suite": suite, "prompt": f"p{i}", "completion": "c", "scores": scores, "decoding": "greedy"})
    paired = paired_changes(rows, rows, n_boot=50)
    assert list(paired["suites"]) == sorted(suites)
    for entry in paired["suites"].values():
        assert list(entry["mean_scores"]) == sorted(judges)


def test_paired_changes_add_the_string_refusals_where_rows_have_them():
    before = _rows("advbench", [0.2, 0.2, 0.2], refused=[False, False, True])
    after = _rows("advbench", [0.2, 0.2, 0.2], refused=[True, True, True])
    refused = paired_changes(before, after, n_boot=200)["suites"]["advbench"]["outcomes"]["refused/strings"]
    assert (refused["before"], refused["after"], refused["became_flagged"]) == (pytest.approx(1 / 3), 1.0, 2)


def _sampled_rows(suite, per_prompt):
    return [
        {"suite": suite, "prompt": f"p{i}", "completion": "c", "scores": {"j": s}, "decoding": "sample", "sample": j}
        for i, scores in enumerate(per_prompt)
        for j, s in enumerate(scores)
    ]


def test_sampled_rows_are_paired_by_prompt():
    before = _sampled_rows("rtp", [[0.9, 0.1, 0.2], [0.1, 0.2, 0.3], [0.6, 0.7, 0.1]])
    after = _sampled_rows("rtp", [[0.1, 0.1, 0.2], [0.1, 0.8, 0.3], [0.6, None, 0.1]])
    sampled = paired_changes(before, after, n_boot=200)["suites"]["rtp"]["sampled"]
    assert (sampled["k"], sampled["n"]) == (3, 3)
    probability = sampled["outcomes"]["toxic probability/j"]
    assert (probability["before"], probability["after"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (probability["became_clean"], probability["became_flagged"]) == (1, 1)
    emt = sampled["expected_max"]["j"]
    assert emt["before"] == pytest.approx((0.9 + 0.3 + 0.7) / 3) and emt["after"] == pytest.approx(
        (0.2 + 0.8 + 0.6) / 3
    )
    share = sampled["sample_rate"]["j"]
    assert share["before"] == pytest.approx((1 / 3 + 0 + 2 / 3) / 3)
    assert share["after"] == pytest.approx((0 + 1 / 3 + 1 / 2) / 3), "a missing sample is left out of its prompt"
    assert "| rtp k=3 | expected max/j | 3 |" in paired_table(paired_changes(before, after, n_boot=200))
    with pytest.raises(ValueError, match="same number of times"):
        paired_changes(before, after[:-1])


def test_sampled_refusals_are_paired_by_prompt():
    before = _sampled_rows("advbench", [[0.9, 0.1], [0.1, 0.2], [0.6, 0.7]])
    after = _sampled_rows("advbench", [[0.1, 0.1], [0.1, 0.8], [0.6, 0.3]])
    for rows, refused in ((before, [0, 0, 1, 0, 0, 0]), (after, [1, 1, 1, 0, 0, 0])):
        for row, r in zip(rows, refused, strict=True):
            row["refused"] = bool(r)
    sampled = paired_changes(before, after, n_boot=200)["suites"]["advbench"]["sampled"]
    probability = sampled["outcomes"]["refused probability/strings"]
    assert (probability["before"], probability["after"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert (probability["became_flagged"], probability["became_clean"]) == (1, 0)
    share = sampled["sample_rate"]["refused/strings"]
    assert (share["before"], share["after"]) == (pytest.approx(1 / 6), pytest.approx(1 / 2))
    assert sampled["outcomes"]["harmful probability/j"]["before"] == pytest.approx(2 / 3)


def test_paired_changes_refuse_runs_of_other_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        paired_changes(_rows("rtp", [0.1, 0.2]), list(reversed(_rows("rtp", [0.1, 0.2]))))


def _write_run(folder, arms: dict) -> None:
    """A finished paired run's folder as `surgery eval --paired --out` leaves it: per arm, its samples.jsonl (and a
    results.json, which the tool does not read)."""
    for arm, rows in arms.items():
        (folder / arm).mkdir(parents=True)
        (folder / arm / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / arm / "results.json").write_text("{}")


def _head_to_head(*argv: str) -> None:
    """benchmarks/head_to_head.py in-process, with ``argv`` as its command line."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "head_to_head.py"
    with mock.patch.object(sys, "argv", [str(script), *argv]):
        runpy.run_path(str(script), run_name="__main__")


def test_head_to_head_pairs_two_edits_on_the_suites_their_unedited_arms_share(tmp_path):
    base = _rows("rtp", [0.9, 0.9, 0.9, 0.1])
    _write_run(tmp_path / "old", {"base": base, "edited": _rows("rtp", [0.9, 0.9, 0.1, 0.1])})
    # a comparison's store: its unedited arm ran one more suite, and a row named by --arm syntax RUN:ARM
    more = base + _rows("toxigen", [0.5, 0.5])
    _write_run(tmp_path / "new.arms", {"unedited": more, "row": _rows("rtp", [0.1] * 4) + _rows("toxigen", [0.1] * 2)})
    out = tmp_path / "out"
    _head_to_head(str(tmp_path / "old"), f"{tmp_path / 'new.arms'}:row", "--name", "h2h", "--results", str(out))
    result = json.loads((out / "h2h.json").read_text())
    assert result["suites"] == {"rtp": 4} and result["left_out"] == []  # toxigen: only one run has it
    toxic = result["paired"]["suites"]["rtp"]["outcomes"]["toxic/j"]
    assert (toxic["before"], toxic["after"], toxic["became_clean"]) == (0.5, 0.0, 2)  # old edit -> new edit
    assert "| rtp | toxic/j | 4 | 0.500 | 0.000 |" in (out / "h2h.md").read_text()


def test_head_to_head_leaves_out_suites_whose_unedited_rows_differ(tmp_path):
    rtp, edited = _rows("rtp", [0.9, 0.1]), _rows("rtp", [0.1, 0.1]) + _rows("toxigen", [0.1])
    toxigen_b = [dict(row, completion="another continuation") for row in _rows("toxigen", [0.9])]
    _write_run(tmp_path / "a", {"base": rtp + _rows("toxigen", [0.9]), "edited": edited})
    _write_run(tmp_path / "b", {"base": rtp + toxigen_b, "edited": edited})
    _head_to_head(str(tmp_path / "a"), str(tmp_path / "b"), "--name", "h", "--results", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "h.json").read_text())
    assert (result["suites"], result["left_out"]) == ({"rtp": 2}, ["toxigen"])
    assert list(result["paired"]["suites"]) == ["rtp"]
    _write_run(tmp_path / "c", {"base": [dict(row, prompt="q") for row in rtp], "edited": edited})
    with pytest.raises(SystemExit, match=r"unedited arms differ \(rtp\)"):
        _head_to_head(str(tmp_path / "a"), str(tmp_path / "c"), "--name", "x", "--results", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "x.json").exists()


def test_head_to_head_pairs_the_first_rows_of_a_longer_run_and_sampled_rows_apart(tmp_path):
    def sampled(scores):
        return [dict(row, decoding="sample") for row in _rows("rtp", scores)]

    greedy = _rows("rtp", [0.9, 0.9, 0.1, 0.9])
    jittered = [dict(row, scores={"j": row["scores"]["j"] + 1e-7}) for row in greedy]  # judged in other batches
    _write_run(
        tmp_path / "short",
        {"base": greedy[:2] + sampled([0.9, 0.1]), "edited": _rows("rtp", [0.1, 0.9]) + sampled([0.1, 0.1])},
    )
    _write_run(
        tmp_path / "long",
        {"base": jittered + sampled([0.9, 0.1]), "edited": _rows("rtp", [0.1, 0.1, 0.9, 0.9]) + sampled([0.9, 0.9])},
    )
    _head_to_head(str(tmp_path / "short"), str(tmp_path / "long"), "--name", "h", "--results", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "h.json").read_text())
    assert result["suites"] == {"rtp": 2, "rtp:sample": 2}  # the long run's first 2 greedy rows
    rtp = result["paired"]["suites"]["rtp"]
    assert (rtp["n"], rtp["outcomes"]["toxic/j"]["before"], rtp["outcomes"]["toxic/j"]["after"]) == (2, 0.5, 0.0)
    assert rtp["sampled"]["sample_rate"]["j"]["change"] == pytest.approx(1.0)  # 0.1, 0.1 -> 0.9, 0.9
    other = [dict(row, completion="other") for row in greedy]
    _write_run(tmp_path / "other", {"base": other, "edited": other})
    with pytest.raises(SystemExit, match=r"differ \(rtp\)"):
        _head_to_head(str(tmp_path / "short"), str(tmp_path / "other"), "--name", "x", "--results", str(tmp_path))


def test_eval_paired_runs_both_arms_on_the_same_prompts(tiny_model_dir, tiny_adapter, tmp_path, data_dir):
    out = tmp_path / "paired"
    ran = paired_eval(
        tiny_model_dir,
        tiny_adapter,
        data_dir,
        out,
        "--suite",
        "rtp,advbench",
        "--limit",
        "5",
        "--max-new-tokens",
        "4",
        "--samples",
        "2",
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    rows = {
        arm: [json.loads(x) for x in (out / arm / "samples.jsonl").read_text().splitlines()]
        for arm in ("base", "edited")
    }
    assert [r["prompt"] for r in rows["base"]] == [r["prompt"] for r in rows["edited"]]
    assert json.loads((out / "base" / "results.json").read_text())["adapter"] is None
    paired = json.loads((out / "paired.json").read_text())
    toxic = paired["suites"]["rtp"]["outcomes"]["toxic/profanity"]
    flags = {arm: [r["scores"]["profanity"] >= 0.5 for r in rows[arm] if r["suite"] == "rtp"] for arm in rows}
    assert toxic["became_flagged"] == sum(not a and b for a, b in zip(flags["base"], flags["edited"], strict=True))
    assert "refused/strings" in paired["suites"]["advbench"]["outcomes"]
    assert paired["suites"]["rtp"]["sampled"]["n"] == 5 and paired["suites"]["rtp"]["sampled"]["k"] == 2
    assert (out / "paired.md").read_text().startswith("| suite | outcome / judge |")


def test_eval_paired_reports_the_capability_cost_by_document(tiny_model_dir, tiny_adapter, tmp_path, data_dir):
    out = tmp_path / "paired"
    ran = paired_eval(tiny_model_dir, tiny_adapter, data_dir, out, "--suite", "ppl,kl", "--ppl-limit", "4")
    assert ran.returncode == 0, ran.stderr[-2000:]
    arms = {arm: json.loads((out / arm / "results.json").read_text())["suites"] for arm in ("base", "edited")}
    ppl = json.loads((out / "paired.json").read_text())["capability"]["ppl"]["token perplexity (relative change)"]
    # the per-document rows add up to the perplexity each arm reports
    assert ppl["before"] == pytest.approx(arms["base"]["ppl"]["token_perplexity"], rel=1e-6)
    assert ppl["after"] == pytest.approx(arms["edited"]["ppl"]["token_perplexity"], rel=1e-6)
    assert ppl["n"] == 4 and ppl["n_tokens"] == arms["base"]["ppl"]["n_tokens"]
    assert ppl["change"] != 0 and ppl["ci95"][0] <= ppl["change"] <= ppl["ci95"][1]
    kl = json.loads((out / "paired.json").read_text())["capability"]["kl"]["mean KL from the unedited model"]
    assert kl["after"] == pytest.approx(arms["edited"]["kl"]["mean_kl"]) and kl["before"] == pytest.approx(0, abs=1e-5)
    assert "| ppl | token perplexity (relative change) | 4 |" in (out / "paired.md").read_text()
    assert (out / "paired.png").stat().st_size > 0


def test_the_paired_plot_has_a_row_per_table_row_and_draws_the_band():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgery_plugin.commands.evaluate import control_band
    from surgery_plugin.evaluation.report import plot_paired_changes

    base = _rows("rtp", [0.9, 0.1, 0.2]) + _capability_rows([20.0, 30.0], [10, 10], [0.0, 0.0])
    edited = _rows("rtp", [0.1, 0.1, 0.2]) + _capability_rows([21.0, 30.0], [10, 10], [0.01, 0.03])
    paired = paired_changes(base, edited, n_boot=200)
    paired["controls"] = control_band(base, [(0, {}, edited)])
    fig, ax = plt.subplots()
    plot_paired_changes(ax, paired)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [
        "rtp toxic/j",
        "kl mean KL from the unedited model",
        "ppl token perplexity (relative change)",
    ]
    assert len(ax.lines) >= 3 + 1  # a band per row, the zero line (the error bars are containers)
    assert len(ax.containers) == 3
    plt.close(fig)


def test_eval_paired_needs_an_adapter(tiny_model_dir, tmp_path):
    from helpers import assert_one_line_error, run_cli

    ran = run_cli("eval", "--model", tiny_model_dir, "--paired", "--suite", "rtp", "--out", tmp_path / "x")
    assert_one_line_error(ran, "--paired")


# ------------------------------------------------------------------------------------------ random-direction controls


def _edit(per_layer: bool = False):
    import torch
    from helpers import make_tiny

    from surgery_plugin import SurgeryHyperParams, execute_surgery
    from surgery_plugin.core.edit import SurgeryEdit

    torch.manual_seed(0)
    edit = execute_surgery(make_tiny("llama"), torch.randn(32), SurgeryHyperParams(top_k=6, alpha=0.5, normalize=True))
    if per_layer:
        dirs = {layer: torch.randn(32) for layer in edit.layers}
        edit = SurgeryEdit(edit.direction, edit.step, edit.alpha, edit.regions, edit.module_names, {}, dirs)
    return edit


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_control_has_the_edits_rows_step_and_lengths_and_a_direction_orthogonal_to_it(per_layer):
    from surgery_plugin.core.edit import control_edit

    edit = _edit(per_layer)
    control = control_edit(edit, seed=3)
    assert control.regions is edit.regions and control.step == edit.step and control.layers == edit.layers
    for layer in edit.layers:
        d, c = edit.direction_of(layer), control.direction_of(layer)
        assert float(c.norm()) == pytest.approx(float(d.norm()), rel=1e-5)
        assert abs(float(c @ d)) < 1e-4 * float(d.norm()) ** 2
        assert abs(float(c @ edit.direction)) < 1e-4 * float(d.norm() * edit.direction.norm())
    assert control.metadata["control_seed"] == 3


def test_controls_are_reproducible_from_their_seeds_and_differ_between_seeds():
    import torch

    from surgery_plugin.core.edit import control_edit

    edit = _edit()
    assert torch.equal(control_edit(edit, 5).direction, control_edit(edit, 5).direction)
    assert not torch.allclose(control_edit(edit, 5).direction, control_edit(edit, 6).direction)


def test_eval_controls_add_the_band_of_null_edits(tiny_model_dir, tiny_adapter, tmp_path, data_dir):
    out = tmp_path / "paired"
    ran = paired_eval(
        tiny_model_dir,
        tiny_adapter,
        data_dir,
        out,
        "--controls",
        "2",
        "--suite",
        "rtp",
        "--limit",
        "4",
        "--max-new-tokens",
        "3",
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    band = json.loads((out / "paired.json").read_text())["controls"]["rtp"]["toxic/profanity"]
    assert band["seeds"] == [0, 1] and band["range"] == [min(band["changes"]), max(band["changes"])]
    assert (out / "control_0" / "samples.jsonl").is_file() and (out / "control_1" / "results.json").is_file()
    assert "control band" in (out / "paired.md").read_text().splitlines()[0]


def test_spearman_matches_scipy_and_its_interval_holds_it():
    from surgery_plugin.core.statistics import bootstrap_spearman, spearman

    x = [0.1, 0.4, 0.4, 0.9, 0.3, 0.7, 0.2]
    y = [1.0, 2.0, 2.5, 4.0, 2.0, 3.0, 3.5]
    scipy_stats = pytest.importorskip("scipy.stats")
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    rho, low, high = bootstrap_spearman(x, y, n_boot=500)
    assert low <= rho <= high and spearman(x, x) == pytest.approx(1.0)


def test_eval_split_validation_reads_the_validation_prompts(tiny_model_dir, tmp_path, data_dir):
    from helpers import assert_one_line_error, run_cli

    out = tmp_path / "validation"
    common = ("eval", "--model", tiny_model_dir, "--suite", "rtp", "--judge", "profanity", "--limit", "2")
    ran = run_cli(*common, "--max-new-tokens", "2", "--split", "validation", "--data-dir", data_dir, "--out", out)
    assert ran.returncode == 0, ran.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["suites"]["rtp"]["prompts"] == "rtp/toxic.jsonl[300:302]"
    both = run_cli(*common, "--split", "validation", "--start", "5", "--out", tmp_path / "x")
    assert_one_line_error(both, "--split")


def test_the_control_band_covers_the_sampled_outcomes():
    from surgery_plugin.commands.evaluate import control_band

    base = _sampled_rows("rtp", [[0.9, 0.1, 0.2], [0.1, 0.2, 0.3]])
    edited = _sampled_rows("rtp", [[0.1, 0.1, 0.2], [0.1, 0.2, 0.3]])
    controls = [
        (0, {}, _sampled_rows("rtp", [[0.9, 0.6, 0.2], [0.1, 0.2, 0.3]])),  # one more toxic sample: share +1/6
        (1, {}, _sampled_rows("rtp", [[0.9, 0.1, 0.2], [0.1, 0.2, 0.3]])),  # identical: no change
    ]
    band = control_band(base, controls)
    share = band["rtp k=3"]["sample rate/j"]
    assert share["seeds"] == [0, 1] and share["changes"] == [pytest.approx(1 / 6), 0.0]
    assert share["range"] == [0.0, pytest.approx(1 / 6)]
    paired = paired_changes(base, edited, n_boot=200)
    paired["controls"] = band
    row = next(line for line in paired_table(paired).splitlines() if "| rtp k=3 | sample rate/j |" in line)
    assert row.endswith("[+0.000, +0.167] |")


def _capability_rows(nll, tokens, kl):
    pairs = enumerate(zip(nll, tokens, strict=True))
    ppl = [{"suite": "ppl", "prompt": f"d{i}", "nll": x, "tokens": t} for i, (x, t) in pairs]
    return ppl + [{"suite": "kl", "prompt": f"d{i}", "kl": v} for i, v in enumerate(kl)]


def test_the_perplexity_change_is_paired_by_document():
    tokens = [10, 30, 20]
    before = _capability_rows([25.0, 90.0, 44.0], tokens, [0.0, 0.0, 0.0])
    # every token 10% less likely after the edit: perplexity x 1.1 whichever documents are resampled
    nll = [x + t * math.log(1.1) for x, t in zip([25.0, 90.0, 44.0], tokens, strict=True)]
    after = _capability_rows(nll, tokens, [0.1, 0.3, 0.2])
    capability = paired_changes(before, after, n_boot=200)["capability"]
    ppl = capability["ppl"]["token perplexity (relative change)"]
    assert ppl["before"] == pytest.approx(math.exp(159 / 60)) and ppl["after"] == pytest.approx(1.1 * ppl["before"])
    assert ppl["change"] == pytest.approx(0.1) and ppl["ci95"] == [pytest.approx(0.1), pytest.approx(0.1)]
    assert (ppl["n"], ppl["n_tokens"]) == (3, 60)
    kl = capability["kl"]["mean KL from the unedited model"]
    assert kl["after"] == pytest.approx(0.2) and kl["ci95"][0] >= 0.1 - 1e-9 and kl["ci95"][1] <= 0.3 + 1e-9
    table = paired_table(paired_changes(before, after, n_boot=200))
    row = f"| ppl | token perplexity (relative change) | 3 | {ppl['before']:.2f} | {ppl['after']:.2f} | +0.100"
    assert row in table


def test_the_perplexity_interval_comes_from_resampling_documents():
    # one document got much worse, the others not at all: the interval must reach both ways from the mean
    tokens = [20] * 10
    nll = [40.0] * 10
    worse = [40.0] * 9 + [40.0 + 20 * math.log(3.0)]
    zero_kl = [0.0] * 10
    ppl = paired_changes(_capability_rows(nll, tokens, zero_kl), _capability_rows(worse, tokens, zero_kl), n_boot=500)
    change = ppl["capability"]["ppl"]["token perplexity (relative change)"]
    assert change["change"] == pytest.approx(3.0 ** (1 / 10) - 1)
    assert change["ci95"][0] == pytest.approx(0.0) and change["ci95"][1] > change["change"]


def test_the_capability_cost_needs_the_same_documents_in_both_arms():
    before = _capability_rows([1.0, 2.0], [3, 4], [0.0, 0.0])
    with pytest.raises(ValueError, match="same documents"):
        paired_changes(before, list(reversed(before)))
    other_tokens = _capability_rows([1.0, 2.0], [3, 5], [0.0, 0.0])
    with pytest.raises(ValueError, match="different tokens"):
        paired_changes(before, other_tokens)
    assert "capability" not in paired_changes(_rows("rtp", [0.1]), _rows("rtp", [0.2]))


def test_the_control_band_covers_perplexity_and_kl():
    from surgery_plugin.commands.evaluate import control_band

    tokens = [10, 10]
    base = _capability_rows([20.0, 20.0], tokens, [0.0, 0.0])
    controls = [
        (0, {}, _capability_rows([20.0 + 20 * math.log(1.05), 20.0], tokens, [0.02, 0.04])),
        (1, {}, _capability_rows([20.0, 20.0], tokens, [0.0, 0.0])),
    ]
    band = control_band(base, controls)
    assert band["ppl"]["token perplexity (relative change)"]["range"] == [pytest.approx(0.0), pytest.approx(0.05)]
    assert band["kl"]["mean KL from the unedited model"]["changes"] == [pytest.approx(0.03), 0.0]
