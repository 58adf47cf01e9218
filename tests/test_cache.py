"""The cache root on a new machine: made on first use, and one line when it cannot be."""

from __future__ import annotations

import pytest

from surgery_plugin.errors import SurgeryError
from surgery_plugin.io.cache import cache_path, cache_root


def test_a_cache_root_that_does_not_exist_yet_is_made(tmp_path, monkeypatch):
    root = tmp_path / "not" / "yet" / "made"
    monkeypatch.setenv("SURGERY_CACHE", str(root))
    assert cache_root() == root and root.is_dir()
    entry = cache_path("models", "smollm2-135m")
    assert entry == root / "models" / "smollm2-135m" and entry.parent.is_dir() and not entry.exists()


def test_xdg_cache_home_is_the_default_parent(tmp_path, monkeypatch):
    monkeypatch.delenv("SURGERY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "surgery_plugin"


def test_a_cache_root_that_cannot_be_made_is_one_line_naming_it(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SURGERY_CACHE", str(blocker / "cache"))
    with pytest.raises(SurgeryError, match=r"a-file/cache cannot be created or written .*set SURGERY_CACHE"):
        cache_root()


def test_a_read_only_cache_root_is_one_line(tmp_path, monkeypatch):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    root = tmp_path / "ro"
    root.mkdir(mode=0o500)
    monkeypatch.setenv("SURGERY_CACHE", str(root))
    with pytest.raises(SurgeryError, match="SURGERY_CACHE"):
        cache_root()
