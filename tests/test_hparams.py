from pathlib import Path

import pytest
import yaml

from surgery_plugin import SurgeryError, SurgeryHyperParams
from surgery_plugin.config import MAX_YAML_BYTES, parse_list, shipped_hparams_path

HPARAMS = Path(__file__).resolve().parents[1] / "hparams" / "Surgery"
SHIPPED = sorted(HPARAMS.glob("*.yaml"))


def test_every_paper_model_has_a_shipped_yaml():
    shipped = {"smollm2-135m", "llama-7b", "llama2-7b-chat", "mistral-7b", "codellama-7b", "llama2-70b"}
    assert {f.stem for f in SHIPPED} >= shipped


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_yaml_loads_exactly_as_written(path):
    raw = yaml.safe_load(path.read_text())
    for key in ("alg_name", "model_name", "device", "model_parallel", "max_length"):
        assert key in raw, f"{path.name} lacks {key}"
    loaded = SurgeryHyperParams.from_hparams(path).to_dict()
    for key, value in raw.items():  # every key the file sets is read as written ("1e-4" strings as floats)
        assert loaded[key] == (_number_or_text(value) if isinstance(value, str) else value), key


def _number_or_text(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def test_installed_lookup_finds_the_shipped_yaml():
    path = shipped_hparams_path("smollm2-135m")
    assert path.is_file() and path.parent.name == "Surgery"
    assert SurgeryHyperParams.from_hparams(path) == SurgeryHyperParams.from_hparams(HPARAMS / "smollm2-135m.yaml")


def test_unknown_shipped_yaml_lists_the_known_ones():
    with pytest.raises(SurgeryError, match="no shipped hparams/Surgery/nope.yaml .*smollm2-135m"):
        shipped_hparams_path("nope")


def test_paper_settings_and_yaml_suffix_optional():
    hp = SurgeryHyperParams.from_hparams(HPARAMS / "llama-7b")  # .yaml optional
    assert (hp.alpha, hp.top_k, hp.probe_layer, hp.normalize) == (1.08, 16384, -1, False)


def test_scientific_strings_become_floats():
    hp = SurgeryHyperParams.from_hparams(HPARAMS / "llama-7b.yaml")
    assert isinstance(hp.probe_lr, float) and hp.probe_lr == 1e-4  # "1e-4" in YAML 1.1 is a string


def test_chat_yaml_is_for_jailbreak():
    chat = SurgeryHyperParams.from_hparams(HPARAMS / "llama2-7b-chat.yaml")
    assert (chat.alpha, chat.behavior) == (1.0, "jailbreak")


def _yaml(tmp_path, text: str, name: str = "hp.yaml") -> Path:
    path = tmp_path / name
    path.write_text("alg_name: Surgery\n" + text)
    return path


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(SurgeryError, match="unknown key 'alhpa'"):
        SurgeryHyperParams.from_hparams(_yaml(tmp_path, "alpha: 1.0\nalhpa: 2.0\n"))


def test_another_algorithms_yaml_is_refused(tmp_path):
    (tmp_path / "rome.yaml").write_text("alg_name: ROME\n")
    with pytest.raises(SurgeryError, match="is for alg_name 'ROME', not 'Surgery'"):
        SurgeryHyperParams.from_hparams(tmp_path / "rome.yaml")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SurgeryError, match="hparams file not found: .*missing.yaml"):
        SurgeryHyperParams.from_hparams(tmp_path / "missing")


# every bad value is a one-line error naming the field (or the problem) and the file
BAD_VALUES = [
    ("alpha: .nan\n", "alpha must be a finite number"),
    ('normalize: "false"\n', "normalize must be true or false, got 'false'"),
    ("normalize: 1\n", "normalize must be true or false, got 1"),
    ("alpha: 1e308\n", "alpha must be <= 10000"),
    ("top_k: .nan\n", "top_k must be a count >= 1 or a fraction in (0, 1)"),
    ("top_k: 2.5\n", "top_k must be a whole count >= 1 or a fraction in (0, 1)"),
    ('layer_range: "1,2"\n', "layer_range must be [start, end] of two whole numbers"),
    ("layer_range: [1, 2, 3]\n", "layer_range must be [start, end] of two whole numbers"),
    ("seed: -1\n", "seed must be >= 0, got -1"),
    ("probe_lr: 1e300\n", "probe_lr must be <= 10"),
    ("probe_lr: 0\n", "probe_lr must be > 0"),
    ("max_rows_per_layer: -1\n", "max_rows_per_layer must be >= 1, got -1"),
    ("probe_max_per_class: -1\n", "probe_max_per_class must be >= 1, got -1"),
    ("probe_epochs: 2.0\n", "probe_epochs must be a whole number"),
    ("pooling: max\n", "pooling must be one of mean, last, mean_drop_first, mean_final_norm, got 'max'"),
    ("device: true\n", "device must be a CUDA index >= 0 or a torch device name"),
    ("alpha: 1.0\nalpha: 2.0\n", "duplicate key 'alpha'"),
    ("extra: &a {x: 1}\nnotes: *a\n", "anchors and aliases are not allowed"),
]


@pytest.mark.parametrize(
    "text, message", BAD_VALUES, ids=[t.split(":")[0] + str(i) for i, (t, _) in enumerate(BAD_VALUES)]
)
def test_bad_value_is_a_one_line_error_naming_the_field(tmp_path, text, message):
    path = _yaml(tmp_path, text)
    with pytest.raises(SurgeryError) as err:
        SurgeryHyperParams.from_hparams(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_an_anchor_without_alias_is_refused(tmp_path):
    with pytest.raises(SurgeryError, match="anchors and aliases are not allowed"):
        SurgeryHyperParams.from_hparams(_yaml(tmp_path, "layer_range: &r [1, 2]\n"))


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("alg_name: Surgery\nnotes: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SurgeryError, match=r"latin1.yaml is not UTF-8 text \(byte 28\)$"):
        SurgeryHyperParams.from_hparams(path)


def test_a_2mb_file_is_refused_before_it_is_parsed(tmp_path):
    path = _yaml(tmp_path, "notes: " + "x" * (2 << 20) + "\n")
    size = path.stat().st_size
    assert size > 2 * MAX_YAML_BYTES - 100
    with pytest.raises(SurgeryError, match=f"hp.yaml is {size} bytes; a hparams file is at most {MAX_YAML_BYTES}$"):
        SurgeryHyperParams.from_hparams(path)


def test_direct_construction_and_replace_are_checked_too():
    with pytest.raises(SurgeryError, match="^seed must be >= 0, got -1$"):
        SurgeryHyperParams(seed=-1)
    with pytest.raises(SurgeryError, match="^normalize must be true or false, got 'yes'$"):
        SurgeryHyperParams().replace(normalize="yes")


def test_numbers_are_normalised():
    hp = SurgeryHyperParams(alpha=2, probe_lr="5e-4", layer_range=(1, 3))
    assert (type(hp.alpha), hp.probe_lr, hp.layer_range) == (float, 5e-4, [1, 3])


def test_parse_list_strips_and_drops_empty_items():
    assert parse_list(" a, b ,,c ", "suite") == ("a", "b", "c")
    assert parse_list(["x", " y"], "method", known=["x", "y"]) == ("x", "y")
    assert parse_list("1, 2", "limit", convert=int) == (1, 2)


@pytest.mark.parametrize(
    "text, known, convert, message",
    [
        (" , ", ["a", "b"], None, "^no suite given; suites: a, b$"),
        ("a,z", ["a", "b"], None, "^unknown suite 'z'; suites: a, b$"),
        ("a, a", None, None, "^suite 'a' given twice$"),
        ("1,x", None, int, r"^suite 'x' is not valid \(invalid literal for int\(\) with base 10: 'x'\)$"),
    ],
)
def test_parse_list_errors_are_one_line(text, known, convert, message):
    with pytest.raises(SurgeryError, match=message):
        parse_list(text, "suite", known=known, convert=convert)
