"""A paired run keeps its finished arms beside --out, and the same command resumes an interrupted run from them."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from helpers import assert_one_line_error, paired_eval, run_cli, write_tiny_hparams

OPTIONS = ("--controls", "1", "--suite", "rtp", "--limit", "3", "--max-new-tokens", "3")


def _interrupted(monkeypatch, *args):
    """The paired run, stopped after every arm finished and before its output was written."""
    import surgery_plugin.commands.evaluate as evaluate

    def stop(*_, **__):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "control_band", stop)
        assert paired_eval(*args).returncode == 130


def _counting(monkeypatch) -> list:
    """Counts the arms measured (not read back) from here on."""
    import surgery_plugin.commands.evaluate as evaluate

    measured, real = [], evaluate.evaluate_plan

    def counted(*args, **kwargs):
        measured.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_plan", counted)
    return measured


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_adapter, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("arms") / "whole"
    ran = paired_eval(tiny_model_dir, tiny_adapter, data_dir, out, *OPTIONS)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return out


def test_an_interrupted_paired_run_resumes_from_its_finished_arms(
    tiny_model_dir, tiny_adapter, data_dir, tmp_path, monkeypatch, uninterrupted
):
    out = tmp_path / "paired"
    args = (tiny_model_dir, tiny_adapter, data_dir, out, *OPTIONS)
    _interrupted(monkeypatch, *args)
    store = tmp_path / "paired.arms"
    assert not out.exists() and sorted(p.name for p in store.iterdir()) == [
        "base",
        "control_0",
        "edited",
        "surgery.json",
    ]
    measured = _counting(monkeypatch)
    ran = paired_eval(*args)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert measured == [], "every arm had finished: none is measured again"
    assert not store.exists(), "the store goes once the run is written"
    for name in ("paired.json", "base/samples.jsonl", "edited/samples.jsonl", "control_0/samples.jsonl"):
        assert (out / name).read_text() == (uninterrupted / name).read_text(), name


def test_an_arm_of_other_settings_is_measured_again(tiny_model_dir, tiny_adapter, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "paired"
    _interrupted(monkeypatch, tiny_model_dir, tiny_adapter, data_dir, out, *OPTIONS)
    measured = _counting(monkeypatch)
    other = [*OPTIONS[:-1], "2"]  # two new tokens instead of three: other rows
    ran = paired_eval(tiny_model_dir, tiny_adapter, data_dir, out, *other)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert len(measured) == 3
    rows = [json.loads(line) for line in (out / "edited" / "samples.jsonl").read_text().splitlines()]
    assert json.loads((out / "edited" / "results.json").read_text())["settings"]["rtp"]["max_new_tokens"] == 2
    assert len(rows) == 3


def test_an_arm_kept_under_another_torch_is_measured_again(
    tiny_model_dir, tiny_adapter, data_dir, tmp_path, monkeypatch, caplog
):
    import surgery_plugin.evaluation.arms as arms

    out = tmp_path / "paired"
    args = (tiny_model_dir, tiny_adapter, data_dir, out, *OPTIONS)
    _interrupted(monkeypatch, *args)
    kept = json.loads((tmp_path / "paired.arms" / "edited" / "surgery.json").read_text())
    assert kept["versions"]["torch"] == arms.package_versions()["torch"]
    real = arms.package_versions
    monkeypatch.setattr(arms, "package_versions", lambda: {**real(), "torch": "99.0"})
    measured = _counting(monkeypatch)
    with caplog.at_level("INFO", logger=arms.__name__):
        ran = paired_eval(*args)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert len(measured) == 3, "every arm was measured with another torch"
    assert f"torch {kept['versions']['torch']} -> 99.0" in caplog.text


def test_a_damaged_arm_is_measured_again(tiny_model_dir, tiny_adapter, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "paired"
    args = (tiny_model_dir, tiny_adapter, data_dir, out, *OPTIONS)
    _interrupted(monkeypatch, *args)
    samples = tmp_path / "paired.arms" / "edited" / "samples.jsonl"
    samples.write_text(samples.read_text().replace('"prompt"', '"prompt "', 1))
    measured = _counting(monkeypatch)
    ran = paired_eval(*args)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert len(measured) == 1


def test_a_folder_of_someone_elses_at_the_stores_place_is_refused_and_left(
    tiny_model_dir, tiny_adapter, data_dir, tmp_path
):
    theirs = tmp_path / "paired.arms"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    ran = paired_eval(tiny_model_dir, tiny_adapter, data_dir, tmp_path / "paired", *OPTIONS)
    assert_one_line_error(ran, "paired.arms", "not a store")
    assert (theirs / "notes.txt").read_text() == "mine" and not (tmp_path / "paired").exists()


# ---------------------------------------------------------------- surgery compare


def _compare(root, model_dir, data_dir, out, *more, methods="surgery,steering,ablation,prompt"):
    """A small comparison of the rows that need no EasyEdit."""
    if not (root / "hparams").exists():
        write_tiny_hparams(root / "hparams", model_dir)
    return run_cli(
        "compare",
        "--model",
        model_dir,
        "--methods",
        methods,
        "--suite",
        "rtp,ppl,kl",
        "--hparams-dir",
        root / "hparams",
        "--data-dir",
        data_dir,
        "--judge",
        "profanity",
        "--records",
        "1",
        "--limit",
        "2",
        "--ppl-limit",
        "3",
        "--max-new-tokens",
        "3",
        "--alphas",
        "",
        "--samples",
        "2",
        "--sample-limit",
        "2",
        "--controls",
        "1",
        "--steering-scales",
        "0.1",
        "--tune-limit",
        "2",
        "--out",
        out,
        *more,
    )


def _measured_parts(result: dict) -> dict:
    """What a comparison measured, per row (not how long it took)."""
    return {
        name: {"suites": row["suites"], "paired": row.get("paired"), "status": row["status"]}
        for name, row in result["methods"].items()
    }


def test_an_interrupted_comparison_resumes_from_its_finished_rows(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from surgery_plugin.commands.compare.methods import Comparison

    whole = _compare(tmp_path, tiny_model_dir, data_dir, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "resumed"

    def stop(*_, **__):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # interrupted at the last row
        patch.setattr(Comparison, "_run_ablation", stop)
        assert _compare(tmp_path, tiny_model_dir, data_dir, out).returncode == 130
    kept = sorted(p.name for p in (tmp_path / "resumed.arms").iterdir())
    assert not out.exists() and kept == [
        "prompt",
        "steering",
        "surgery-records",
        "surgery-shipped",
        "surgery.json",
        "unedited",
    ]
    for method in ("_run_unedited", "_run_surgery", "_run_steering"):
        monkeypatch.setattr(Comparison, method, stop)  # a finished row measured again would interrupt the run
    ran = _compare(tmp_path, tiny_model_dir, data_dir, out)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    expected = json.loads((tmp_path / "whole" / "compare.json").read_text())
    assert _measured_parts(result) == _measured_parts(expected)
    assert result["methods"]["ablation"]["paired"]["controls"] == expected["methods"]["ablation"]["paired"]["controls"]
    assert sorted(result["settings"]["resumed_rows"]) == [k for k in kept if k != "surgery.json"]
    for name in ("surgery-shipped", "steering", "prompt"):  # the restored rows' saved edits are in the output
        assert (out / "edits" / name).is_dir() and (out / "runs" / name / "samples.jsonl").is_file(), name
    assert not (tmp_path / "resumed.arms").exists()


def test_a_comparison_split_by_methods_merges_with_reuse(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """Two parts (one finished, one stopped) and the merged command: it measures only the row neither part
    finished, reads the parts without changing them, and records where each row came from."""
    from surgery_plugin.commands.compare.methods import Comparison

    def stop(*_, **__):
        raise KeyboardInterrupt

    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    ran = _compare(tmp_path, tiny_model_dir, data_dir, a, methods="surgery,prompt")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert not (tmp_path / "a.arms").exists()  # a finished part: its rows are in its output only
    with monkeypatch.context() as patch:  # part b takes the unedited row from a, then stops at ablation
        patch.setattr(Comparison, "_run_unedited", stop)
        patch.setattr(Comparison, "_run_ablation", stop)
        part_b = _compare(tmp_path, tiny_model_dir, data_dir, b, "--reuse", a, methods="steering,ablation")
        assert part_b.returncode == 130
    assert sorted(p.name for p in (tmp_path / "b.arms").iterdir()) == ["steering", "surgery.json", "unedited"]
    parts = {p: sorted(q.relative_to(tmp_path).as_posix() for q in p.rglob("*")) for p in (a, tmp_path / "b.arms")}
    for method in ("_run_unedited", "_run_surgery", "_run_steering", "_run_ablation"):
        monkeypatch.setattr(Comparison, method, stop)  # --reuse-only measures nothing
    partial = _compare(tmp_path, tiny_model_dir, data_dir, tmp_path / "partial", "--reuse", f"{a},{b}", "--reuse-only")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "ablation not measured yet" in partial.stderr
    look = json.loads((tmp_path / "partial" / "compare.json").read_text())
    assert set(look["methods"]) == {"unedited", "prompt", "surgery-records", "surgery-shipped", "steering"}
    assert (
        look["settings"]["not_measured"] == ["ablation"]
        and "**Partial**" in (tmp_path / "partial" / "compare.md").read_text()
    )
    assert (tmp_path / "partial.arms" / "steering").is_dir()  # kept for the run that finishes the comparison
    summary = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "compare_summary.py"))
    assert summary["summary"]([look]).splitlines()[-1].split(" | ")[1:3] == ["ablation", "not measured yet"]
    monkeypatch.undo()
    for method in ("_run_unedited", "_run_surgery", "_run_steering"):
        monkeypatch.setattr(Comparison, method, stop)  # a row taken from a part and measured again would stop the run
    ran = _compare(tmp_path, tiny_model_dir, data_dir, merged, "--reuse", f"{a},{b},{tmp_path / 'partial'}")
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads((merged / "compare.json").read_text())
    part_a = json.loads((a / "compare.json").read_text())
    assert result["settings"]["reused_rows"] == {
        "unedited": str(a),
        "prompt": str(a),
        "surgery-records": str(a),
        "surgery-shipped": str(a),
        "steering": str(b),
    }
    assert result["settings"]["resumed_rows"] == []
    for name in ("unedited", "prompt", "surgery-shipped"):
        assert _measured_parts(result)[name]["suites"] == _measured_parts(part_a)[name]["suites"], name
    # the band the controls of a's Surgery row measured is beside the row the merged run measured
    assert result["methods"]["ablation"]["paired"]["controls"] == part_a["methods"]["prompt"]["paired"]["controls"]
    assert (merged / "edits" / "surgery-shipped").is_dir()
    assert (merged / "runs" / "steering" / "samples.jsonl").is_file()
    assert {p: sorted(q.relative_to(tmp_path).as_posix() for q in p.rglob("*")) for p in parts} == parts  # only read
    assert not (tmp_path / "merged.arms").exists()
    # a part measured with other settings gives nothing; a run that is no comparison is a one-line error
    other = _compare(tmp_path, tiny_model_dir, data_dir, tmp_path / "other", "--reuse", a, "--limit", "3")
    assert other.returncode == 130  # the unedited row was measured (and stopped), not taken from a
    assert_one_line_error(
        _compare(tmp_path, tiny_model_dir, data_dir, tmp_path / "c", "--reuse", tmp_path / "nothing"),
        "--reuse",
        "no comparison there",
    )


def test_an_arms_fingerprint_holds_its_own_identity_and_not_the_other_arms(tmp_path):
    """A comparison with one more baseline reuses the rows it shares with an earlier one (a split run merges)."""
    from surgery_plugin.evaluation.arms import ArmStore

    run = {"model": "m", "limit": 3}
    fewer = ArmStore(tmp_path / "a", run, {"rome": {"hparams": {"layers": [5]}}})
    more = ArmStore(tmp_path / "b", run, {"rome": {"hparams": {"layers": [5]}}, "dinm": {"hparams": {"lr": 1}}})
    other_rome = ArmStore(tmp_path / "c", run, {"rome": {"hparams": {"layers": [4]}}})
    assert fewer.key("unedited") == more.key("unedited") == other_rome.key("unedited")
    assert fewer.key("rome") == more.key("rome") != other_rome.key("rome")
    assert ArmStore(tmp_path / "d", {**run, "limit": 4}).key("unedited") != fewer.key("unedited")


# ---------------------------------------------------------------- inside an arm: the batch journal


def _stopping_after(monkeypatch, n: int) -> list:
    """Generation batches actually generated from here on; the ``n+1``-th is interrupted (``n=None``: never)."""
    from surgery_plugin.evaluation import generation

    generated, real = [], generation._generate_batch

    def counted(*args, **kwargs):
        if n is not None and len(generated) == n:
            raise KeyboardInterrupt
        generated.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "_generate_batch", counted)
    return generated


def test_a_journal_replays_the_finished_batches_and_generates_the_rest(tmp_path, monkeypatch):
    from helpers import CharTokenizer, make_tiny

    from surgery_plugin.evaluation.generation import generate_continuations
    from surgery_plugin.evaluation.journal import journal

    model, tok = make_tiny("llama"), CharTokenizer()
    prompts = [f"prompt {i} " * (i + 1) for i in range(5)]
    # one prompt (two samples) per batch: five batches, with token ids
    settings = dict(max_new_tokens=3, batch_size=2, num_samples=2, seed=1, progress=False, return_ids=True)
    whole = generate_continuations(model, tok, prompts, **settings)
    path, header = tmp_path / "edited.journal.jsonl", {"arm": "edited", "fingerprint": "f"}
    with monkeypatch.context() as patch:
        _stopping_after(patch, 3)
        with pytest.raises(KeyboardInterrupt), journal(path, header):
            generate_continuations(model, tok, prompts, **settings)
    assert len(path.read_text().splitlines()) == 1 + 3
    with open(path, "a") as f:  # the crash cut a fourth batch short
        f.write('{"key": "0a1b')
    with monkeypatch.context() as patch:
        generated = _stopping_after(patch, None)
        with journal(path, header) as kept:
            assert generate_continuations(model, tok, prompts, **settings) == whole
    assert (kept.replayed, len(generated)) == (3, 2)
    assert len(path.read_text().splitlines()) == 1 + 5, "the cut line is gone, the new batches appended"

    with monkeypatch.context() as patch:  # another arm's journal (another fingerprint) replays nothing
        generated = _stopping_after(patch, None)
        with journal(path, {**header, "fingerprint": "g"}) as other:
            assert generate_continuations(model, tok, prompts, **settings) == whole
    assert (other.replayed, len(generated)) == (0, 5)

    with monkeypatch.context() as patch:  # other prompts: replayed up to where the batches differ
        generated = _stopping_after(patch, None)
        changed = [*prompts[:4], "another prompt entirely, and the longest " * 3]
        with journal(path, {**header, "fingerprint": "g"}) as other:
            expected = generate_continuations(model, tok, changed, **settings)
    assert (other.replayed, len(generated)) == (4, 1)
    assert expected[0][:4] == whole[0][:4]


def test_an_arm_interrupted_mid_way_resumes_from_its_last_batch(
    tiny_model_dir, tiny_adapter, data_dir, tmp_path, monkeypatch
):
    options = (*OPTIONS, "--batch-size", "1")  # three batches per arm
    whole = tmp_path / "whole"
    assert paired_eval(tiny_model_dir, tiny_adapter, data_dir, whole, *options).returncode == 0
    out = tmp_path / "paired"
    args = (tiny_model_dir, tiny_adapter, data_dir, out, *options)
    with monkeypatch.context() as patch:  # base's three batches, the edit's first, then the stop
        _stopping_after(patch, 4)
        assert paired_eval(*args).returncode == 130
    store = tmp_path / "paired.arms"
    assert sorted(p.name for p in store.iterdir()) == ["base", "edited.journal.jsonl", "surgery.json"]
    generated = _stopping_after(monkeypatch, None)
    ran = paired_eval(*args)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert len(generated) == 2 + 3, "the edit's two unfinished batches and the control's three"
    assert not store.exists()
    for name in ("paired.json", "base/samples.jsonl", "edited/samples.jsonl", "control_0/samples.jsonl"):
        assert (out / name).read_text() == (whole / name).read_text(), name


def test_reuse_takes_a_finished_row_only_with_this_runs_fingerprint_and_names_a_bad_source(tmp_path, caplog):
    from surgery_plugin.commands.compare.reuse import check_sources, finished_output_row
    from surgery_plugin.core.provenance import package_versions
    from surgery_plugin.errors import SurgeryError
    from surgery_plugin.io.files import json_text, write_manifest

    run = tmp_path / "part"
    (run / "runs" / "dinm").mkdir(parents=True)
    (run / "runs" / "dinm" / "samples.jsonl").write_text('{"prompt": "p", "text": "t"}\n')
    row = {"status": "ok", "label": "dinm", "method": "dinm", "suites": {"rtp": {}}, "cost": {"edit_seconds": 1.0}}
    row["paired"] = {"suites": {}, "controls": {"rtp": {}}}
    methods = {"dinm": {**row, "fingerprint": "abc"}, "rome": row, "ft-l": {**row, "status": "failed"}}
    compare = {"methods": methods, "settings": {"versions": package_versions(("lm_eval",))}}
    (run / "compare.json").write_text(json_text(compare))
    write_manifest(run, {"kind": "compare", "model": "m"}, names=["compare.json"])
    assert check_sources((str(run),), tmp_path / "merged") == [run]
    result, samples, band = finished_output_row(run, "dinm", "abc")
    assert samples == [{"prompt": "p", "text": "t"}] and band is None  # no controls measured in this row
    assert result == {k: v for k, v in row.items() if k not in ("label", "method")} | {"paired": {"suites": {}}}
    with caplog.at_level("INFO"):
        assert finished_output_row(run, "dinm", "other settings") is None
        assert finished_output_row(run, "rome", "abc") is None  # an older output: rows without fingerprints
        assert finished_output_row(run, "ft-l", "abc") is None and finished_output_row(run, "ft-m", "abc") is None
    assert "other settings" in caplog.text and "no fingerprint" in caplog.text
    compare["settings"]["versions"]["torch"] = "0.0"
    (run / "compare.json").write_text(json_text(compare))
    write_manifest(run, {"kind": "compare", "model": "m"}, names=["compare.json"])
    with caplog.at_level("INFO"):
        assert finished_output_row(run, "dinm", "abc") is None
    assert "torch 0.0 ->" in caplog.text
    for source, message in ((tmp_path / "none", "no comparison there"), (tmp_path / "merged", "own --out")):
        with pytest.raises(SurgeryError, match=message):
            check_sources((str(source),), tmp_path / "merged")
