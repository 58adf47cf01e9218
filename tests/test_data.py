import pytest

from surgery_plugin import SurgeryError
from surgery_plugin.data.loaders import (
    clean_tweet,
    load_advbench,
    load_benign_texts,
    load_davidson,
    load_rtp,
    load_safeedit,
    load_toxigen_prompts,
)
from surgery_plugin.data.paths import resolve_data_dir


def test_davidson_labels_neither_as_acceptable(data_dir):
    full = load_davidson(data_dir)
    assert len(full.texts) > 24000
    assert full.labels.count(0) == 4163  # class 2 "neither"


def test_davidson_balanced_and_described(data_dir):
    balanced = load_davidson(data_dir, max_per_class=500, seed=0)
    assert balanced.labels.count(0) == balanced.labels.count(1) == 500
    assert "sha256:" in balanced.description and "seed=0" in balanced.description


def test_davidson_balance_is_seeded(data_dir):
    first = load_davidson(data_dir, max_per_class=500, seed=0)
    assert load_davidson(data_dir, max_per_class=500, seed=0).texts == first.texts
    assert load_davidson(data_dir, max_per_class=500, seed=1).texts != first.texts


def test_clean_tweet():
    assert clean_tweet("!!! RT @mayasolovely: As a woman &amp; http://t.co/x") == "As a woman & URL"


def test_toxigen_prompts_split_into_lines(data_dir):
    prompts = load_toxigen_prompts(data_dir, "hate")
    assert len(prompts) == 13 and "asian" in prompts
    first = prompts["asian"][0]
    assert first.startswith("- ") and "\n- " in first and "\\n" not in first


def test_unknown_toxigen_group_is_named(data_dir):
    with pytest.raises(SurgeryError, match="unknown ToxiGen group"):
        load_toxigen_prompts(data_dir, "hate", groups=["martians"])


def test_rtp_challenging_toxic_prompts(data_dir):
    toxic = load_rtp(data_dir, "toxic")
    assert len(toxic) == 1000 and all(r["challenging"] for r in toxic)


def test_benign_texts_limit_and_start(data_dir):
    benign = load_benign_texts(data_dir, limit=10)
    assert len(benign) == 10 and all(benign)
    assert load_benign_texts(data_dir, limit=5, start=5) == benign[5:]


@pytest.mark.parametrize("loader, n", [(load_advbench, 520), (load_safeedit, 93)])
def test_other_sets_sizes(data_dir, loader, n):
    assert len(loader(data_dir)) == n


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    with pytest.raises(SurgeryError, match="missing data file .*davidson/labeled_data.csv"):
        load_davidson()


def test_a_missing_data_folder_is_named(tmp_path):
    with pytest.raises(SurgeryError, match="data folder not found"):
        load_rtp(tmp_path / "nope")


def test_a_data_dir_variable_that_is_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(SurgeryError, match="not a folder"):
        resolve_data_dir()


def test_no_data_folder_and_no_hub_client_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    import surgery_plugin.data.paths as paths

    monkeypatch.delenv("SURGERY_DATA_DIR", raising=False)
    monkeypatch.setattr(paths, "_default_candidates", lambda: [tmp_path / "absent"])
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(SurgeryError, match="no data folder found .*pip install datasets"):
        load_rtp()
