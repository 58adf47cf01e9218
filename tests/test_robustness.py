"""Nothing lost, nothing half-written, nothing silently wrong (issue 19).

- a corpus of bad inputs, each a one-line error that leaves the file system exactly as it was;
- writers killed (SIGKILL) at named points of a write: the old output or the new one, whole;
- two writers and a reader on one output: one writer at a time, and the reader never gets a mix.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from helpers import make_tiny, run_cli, save_tiny_model

from surgery_plugin import SurgeryHyperParams, execute_surgery, export_adapter, merge_into
from surgery_plugin.core.probe import Probe
from surgery_plugin.errors import SurgeryError
from surgery_plugin.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from surgery_plugin.io.files import FAULT_ENV, MANIFEST, is_temp_name, manifest_files, seal


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with what it is, its size and its bytes' digest (a folder: its entries)."""
    import hashlib

    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _one_line_error(ran, *fragments):
    assert ran.returncode == 2, (ran.returncode, ran.stderr[-2000:])
    lines = [line for line in ran.stderr.strip().splitlines() if line.startswith("surgery: error:")]
    assert len(lines) == 1 and "Traceback" not in ran.stderr, ran.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _edit(model, alpha: float = 0.5, seed: int = 0):
    torch.manual_seed(seed)
    return execute_surgery(model, torch.randn(32), SurgeryHyperParams(top_k=6, alpha=alpha, normalize=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, a probe, a shipped-style YAML and an adapter made by the CLI, once per module."""
    root = tmp_path_factory.mktemp("world")
    model_dir = save_tiny_model(root / "tiny-llama")
    hp = root / "hp.yaml"
    hp.write_text("probe_layer: 2\nmax_length: 32\nprobe_max_per_class: 20\ntop_k: 6\nnormalize: true\nalpha: 0.5\n")
    data = root / "data.csv"
    data.write_text(
        "text,label\n" + "".join(f"you are a stupid idiot {i},1\ni love sunny days {i},0\n" for i in range(20))
    )
    ran = run_cli("probe", "--model", model_dir, "--hparams", hp, "--data", data, "--out", root / "probe.safetensors")
    assert ran.returncode == 0, ran.stderr[-2000:]
    ran = run_cli(
        "edit", "--model", model_dir, "--hparams", hp, "--probe", root / "probe.safetensors", "--out", root / "adapter"
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    return root, model_dir, hp


_FILES: dict[str, bytes] = {}  # the bad input files the corpus names, written by the fixture


def _bad_yaml(root: Path, name: str, text: str | bytes) -> Path:
    _FILES[name] = text if isinstance(text, bytes) else text.encode()
    return root / name


# ------------------------------------------------------------------------------------------ the corpus


def _cases(root: Path, model_dir: Path, hp: Path) -> list[tuple[str, list, tuple[str, ...]]]:
    """(name, argv, fragments of the one error line) for every class of bad input."""
    probe, adapter = root / "probe.safetensors", root / "adapter"
    keep = root / "keep"
    edit = ["edit", "--model", model_dir, "--hparams", hp, "--probe", probe]
    cases = [
        (
            "probe onto a folder of other files",
            ["probe", "--model", model_dir, "--hparams", hp, "--out", keep],
            ("not a surgery output",),
        ),
        (
            "probe onto a text file",
            ["probe", "--model", model_dir, "--hparams", hp, "--out", keep / "notes.txt"],
            ("not a surgery output",),
        ),
        (
            "probe onto a probe without --overwrite",
            ["probe", "--model", model_dir, "--hparams", hp, "--out", probe],
            ("--overwrite",),
        ),
        ("edit onto '..' with --overwrite", [*edit, "--out", "..", "--overwrite"], ("working folder",)),
        ("edit onto 'sub/..' with --overwrite", [*edit, "--out", "sub/..", "--overwrite"], ("working folder",)),
        ("edit onto '.'", [*edit, "--out", ".", "--overwrite"], ("working folder",)),
        ("edit onto an empty name", [*edit, "--out", ""], ("empty",)),
        ("edit onto the home folder", [*edit, "--out", str(Path.home()), "--overwrite"], ("home folder",)),
        (
            "edit onto a folder of other files with --overwrite",
            [*edit, "--out", keep, "--overwrite"],
            ("not a surgery output",),
        ),
        ("edit onto a symlink with --overwrite", [*edit, "--out", root / "link", "--overwrite"], ("symbolic link",)),
        ("edit onto a dangling symlink", [*edit, "--out", root / "dangling", "--overwrite"], ("symbolic link",)),
        ("edit onto an adapter without --overwrite", [*edit, "--out", adapter], ("--overwrite",)),
        ("edit onto a probe file", [*edit, "--out", probe, "--overwrite"], ("kind 'probe'",)),
        ("edit with a 300-character name", [*edit, "--out", root / ("x" * 300)], ("too long",)),
        (
            "eval onto an existing file",
            ["eval", "--model", model_dir, "--suite", "ppl", "--ppl-limit", "2", "--out", keep / "notes.txt"],
            ("not a surgery output",),
        ),
        (
            "merge onto a symlink",
            ["merge", "--model", model_dir, "--adapter", adapter, "--out", root / "link", "--overwrite"],
            ("symbolic link",),
        ),
        ("a misspelt embedded model", ["model-path", "gemma3-27om"], ("did you mean",)),
        (
            "a model folder without config.json",
            ["eval", "--model", keep, "--suite", "ppl", "--out", root / "r1"],
            ("config.json",),
        ),
        (
            "a model folder whose weights are a pickle",
            ["eval", "--model", root / "pickled", "--suite", "ppl", "--out", root / "r4"],
            ("cannot load model",),
        ),
        (
            "an adapter folder that is not one",
            ["eval", "--model", model_dir, "--adapter", keep, "--suite", "ppl", "--out", root / "r2"],
            ("surgery.json",),
        ),
        ("an unknown suite", ["eval", "--model", model_dir, "--suite", "rtpp", "--out", root / "r3"], ("rtpp",)),
        (
            "hparams of another behavior",
            [
                "edit",
                "--behavior",
                "jailbreak",
                "--model",
                model_dir,
                "--hparams",
                hp,
                "--probe",
                probe,
                "--out",
                root / "a2",
            ],
            ("behavior 'toxicity'",),
        ),
    ]
    yamls = {
        "normalize as a string": ("normalize: 'false'\n", "normalize must be true or false"),
        "alpha 1e308": ("alpha: 1e308\n", "alpha must be <="),
        "top_k NaN": ("top_k: .nan\n", "top_k"),
        "top_k inf": ("top_k: .inf\n", "top_k"),
        "layer_range a string": ("layer_range: '1,2'\n", "layer_range"),
        "layer_range floats": ("layer_range: [0.5, 2.5]\n", "layer_range"),
        "layer_range a map": ("layer_range: {a: 1}\n", "layer_range"),
        "layer_range 1e9": ("layer_range: [0, 1000000000]\n", "layer_range"),
        "a string for an int": ("probe_epochs: 'nine'\n", "probe_epochs"),
        "seed -1": ("seed: -1\n", "seed must be >= 0"),
        "probe_lr 1e300": ("probe_lr: 1e300\n", "probe_lr"),
        "max_rows_per_layer -1": ("max_rows_per_layer: -1\n", "max_rows_per_layer"),
        "probe_max_per_class -1": ("probe_max_per_class: -1\n", "probe_max_per_class"),
        "a duplicate key": ("alpha: 0.5\nalpha: 0.7\n", "duplicate key 'alpha'"),
        "an anchor and alias": ("notes: &a hello\nbehavior: *a\n", "anchors and aliases"),
        "an unknown key": ("alhpa: 0.5\n", "unknown key 'alhpa'"),
        "not a mapping": ("- 1\n- 2\n", "mapping"),
        "not UTF-8": (b"notes: \xff\xfe\n", "not UTF-8"),
        "malformed": ("alpha: [0.5\n", "not valid YAML"),
        "extra too big": ("extra: {blob: '" + "x" * 70000 + "'}\n", "extra holds"),
    }
    for name, (text, fragment) in yamls.items():
        path = _bad_yaml(root, f"bad-{len(cases)}.yaml", text)
        cases.append((f"hparams: {name}", [*edit, "--hparams", path, "--out", root / "never"], (fragment,)))
    big = _bad_yaml(root, "big.yaml", "notes: '" + "x" * (2 << 20) + "'\n")
    cases.append(("hparams: a 2 MB file", [*edit, "--hparams", big, "--out", root / "never"], ("at most",)))
    datas = {
        "a label 2": ("text,label\na,0\nb,1\nc,2\n", ":4: label '2'"),
        "a label yes": ("text,label\na,yes\n", ":2: label 'yes'"),
        "a label 0.0": ("text,label\na,0.0\n", ":2: label '0.0'"),
        "missing columns": ("txt,lab\na,0\n", "needs the columns"),
    }
    for name, (text, fragment) in datas.items():
        path = _bad_yaml(root, f"bad-{len(cases)}.csv", text)
        cases.append(
            (
                f"probe data: {name}",
                ["probe", "--model", model_dir, "--hparams", hp, "--data", path, "--out", root / "p2"],
                (fragment,),
            )
        )
    jsonl = _bad_yaml(root, "bad.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1\n')
    cases.append(
        (
            "probe data: a truncated JSONL line",
            ["probe", "--model", model_dir, "--hparams", hp, "--data", jsonl, "--out", root / "p2"],
            (":2: not a JSON object",),
        )
    )
    undecodable = _bad_yaml(root, "bad-utf8.csv", b"text,label\n\xff\xfe,1\n")
    cases.append(
        (
            "probe data: not UTF-8",
            ["probe", "--model", model_dir, "--hparams", hp, "--data", undecodable, "--out", root / "p2"],
            ("not UTF-8",),
        )
    )
    return cases


class _NotWeights:
    """Unpickling this would run code: a weights_only load must refuse it, never construct it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def _pickled_model(model_dir: Path, folder: Path) -> None:
    """A model folder whose weights file is a pickle of an arbitrary object (config and tokenizer are real)."""
    import shutil

    folder.mkdir()
    for path in model_dir.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, folder / path.name)
    torch.save({"model.embed_tokens.weight": _NotWeights()}, folder / "pytorch_model.bin")


CASE_NAMES = [name for name, _, _ in _cases(Path("/corpus"), Path("/corpus"), Path("/corpus"))]


@pytest.fixture(scope="module")
def corpus(world):
    root, model_dir, hp = world
    keep = root / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    (root / "link").symlink_to(keep)
    (root / "dangling").symlink_to(root / "nowhere")
    _pickled_model(model_dir, root / "pickled")
    cases = {name: (argv, fragments) for name, argv, fragments in _cases(root, model_dir, hp)}
    for name, data in _FILES.items():
        (root / name).write_bytes(data)
    return cases


def test_the_corpus_covers_every_class_of_bad_input():
    assert len(CASE_NAMES) >= 45 and len(set(CASE_NAMES)) == len(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_bad_input_is_one_line_and_changes_nothing(name, corpus, world, monkeypatch):
    root, _, _ = world
    argv, fragments = corpus[name]
    work = root / "cwd"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)  # '.', '..' and 'sub/..' are relative to a folder of the test's own
    before = _tree(root)
    ran = run_cli(*argv)
    _one_line_error(ran, *fragments)
    assert _tree(root) == before, name


# ------------------------------------------------------------------------------------------ the one adapter loader


def _reseal(folder: Path) -> None:
    """Rewrite the manifest's digests and seal after a change (what a careless tool could do): the loader's
    semantic checks must still catch a config or tensors that disagree with the record."""
    record = json.loads((folder / MANIFEST).read_text())
    record["files"] = manifest_files(folder, [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    (folder / MANIFEST).write_text(json.dumps(seal(record)))


@pytest.fixture
def adapter(tmp_path):
    model = make_tiny("llama")
    return export_adapter(_edit(model), model, tmp_path / "adapter", "tiny-llama")


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda c: c.update(target_modules=["model.layers.0.mlp.up_proj"]), "target_modules"),
        (lambda c: c.update(lora_alpha=2), "lora_alpha"),
        (lambda c: c.update(r=2), "r="),
        (lambda c: c.update(use_dora=True), "use_dora"),
        (lambda c: c.update(use_rslora=True), "use_rslora"),
        (lambda c: c.update(bias="all"), "bias"),
    ],
)
def test_a_config_that_disagrees_with_the_edit_is_refused(adapter, change, fragment):
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    change(config)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(SurgeryError, match="does not match its surgery.json"):
        read_adapter(adapter)
    _reseal(adapter)
    with pytest.raises(SurgeryError, match=fragment):
        read_adapter(adapter)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused(adapter, value):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = value
    save_file(tensors, str(adapter / ADAPTER_WEIGHTS))
    _reseal(adapter)
    with pytest.raises(SurgeryError, match="NaN or infinite"):
        read_adapter(adapter)


@pytest.mark.parametrize("field, value, fragment", [("alpha", 9.0, "alpha"), ("step", 9.0, "step")])
def test_an_edited_record_is_refused(adapter, field, value, fragment):
    record = json.loads((adapter / MANIFEST).read_text())
    record[field] = value
    (adapter / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(SurgeryError, match="seal"):
        read_adapter(adapter)
    (adapter / MANIFEST).write_text(json.dumps(seal(record)))
    with pytest.raises(SurgeryError, match=fragment):
        read_adapter(adapter)


@pytest.mark.parametrize("rows", [1, 6])
def test_a_second_merge_is_refused_for_any_number_of_rows(tmp_path, rows):
    model = make_tiny("llama")
    torch.manual_seed(1)
    edit = execute_surgery(model, torch.randn(32), SurgeryHyperParams(top_k=rows, alpha=0.3, normalize=True))
    folder = export_adapter(edit, model, tmp_path / "a", "tiny-llama")
    merge_into(model, folder)
    with pytest.raises(SurgeryError, match="already merged"):
        merge_into(model, folder)


def test_temp_folders_are_never_loaded_as_adapters(adapter):
    tmp = adapter.with_name(f".{adapter.name}.tmp-{os.getpid()}-abcd1234")
    adapter.rename(tmp)
    assert is_temp_name(tmp)
    with pytest.raises(SurgeryError, match="temporary"):
        read_adapter(tmp)


# ------------------------------------------------------------------------------------------ killed writers


def _write(alpha: float, out: Path, what: str) -> None:
    model = make_tiny("llama")
    torch.manual_seed(0)
    direction = torch.randn(32)
    if what == "adapter":
        edit = execute_surgery(model, direction, SurgeryHyperParams(top_k=6, alpha=alpha, normalize=True))
        export_adapter(edit, model, out, "tiny-llama", overwrite=True)
    else:
        meta = dict(
            model="m",
            layer=1,
            pooling="mean",
            hidden_size=32,
            n_train=4,
            test_accuracy=1.0,
            test_auc=1.0,
            data="d",
            seed=0,
        )
        Probe(torch.stack([-direction, alpha * direction]), torch.zeros(2), meta).save(out, overwrite=True)


def _killed_writing(alpha: float, out: Path, what: str, fault: str) -> int:
    """Write in a forked child that ``SURGERY_FAULT_AT`` kills at ``fault``; returns the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # the child: write, and never return into pytest
        os.environ[FAULT_ENV] = fault
        try:
            _write(alpha, out, what)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _alpha_of(out: Path, what: str) -> float:
    if what == "adapter":
        return read_adapter(out).record["alpha"]
    weight = Probe.load(out).weight
    return float(weight[1, 0] / -weight[0, 0])


@pytest.mark.parametrize("what", ["adapter", "probe"])
def test_a_writer_killed_at_any_point_leaves_the_old_output_or_the_new_one_whole(tmp_path, what):
    out = tmp_path / ("adapter" if what == "adapter" else "probe.safetensors")
    _write(0.25, out, what)
    assert _killed_writing(0.5, out, what, "before-swap") == signal.SIGKILL
    assert _alpha_of(out, what) == pytest.approx(0.25)  # the old one, whole
    assert any(is_temp_name(p) for p in tmp_path.iterdir())  # what the dead writer left
    assert _killed_writing(0.75, out, what, "after-swap") == signal.SIGKILL
    assert _alpha_of(out, what) == pytest.approx(0.75)  # the new one, whole
    _write(1.0, out, what)
    assert _alpha_of(out, what) == pytest.approx(1.0)
    assert not any(
        is_temp_name(p) or p.name.endswith(".lock") for p in tmp_path.iterdir()
    )  # cleaned by the next write


# ------------------------------------------------------------------------------------------ two writers, one reader


def test_a_second_writer_fails_in_one_line_while_the_first_holds_the_output(tmp_path):
    from surgery_plugin.io.files import output

    target = tmp_path / "adapter"
    with output(target, "adapter") as tmp:
        (tmp / "x").write_text("first")
        with pytest.raises(SurgeryError, match="another process is writing"):
            with output(target, "adapter"):
                pass
        (tmp / MANIFEST).write_text(json.dumps({"kind": "adapter"}))
    assert (target / "x").read_text() == "first"


def test_a_reader_never_gets_a_mix_while_a_writer_replaces_the_adapter(tmp_path):
    model = make_tiny("llama")
    out = tmp_path / "adapter"
    export_adapter(_edit(model, 0.2), model, out, "tiny-llama")
    stop, seen, errors = threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                files = read_adapter(out)  # checks the record against the tensors and the digests
            except SurgeryError as err:
                errors.append(str(err))
                continue
            steps = {round(float(u.scales[0]), 6) for u in files.updates()}
            seen.append((files.record["alpha"], steps))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            export_adapter(_edit(model, 0.2 + 0.1 * (i % 2)), model, out, "tiny-llama", overwrite=True)
    finally:
        stop.set()
        reader.join()
    assert seen, errors
    for _alpha, steps in seen:
        assert len(steps) == 1  # every layer of one version
    assert not [e for e in errors if "changed while it was read" not in e], errors
