"""Where the local data folder is: ``--data-dir``, then ``$SURGERY_DATA_DIR``, then ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SurgeryError

ENV_VAR = "SURGERY_DATA_DIR"


def _default_candidates() -> list[Path]:
    repo_root = Path(__file__).resolve().parents[2]  # a source checkout: <repo>/surgery_plugin/data/paths.py
    return [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data folder, or None when there is none (loaders then try the hub)."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise SurgeryError(f"data folder not found: {path}")
        return path.resolve()
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
        if not path.is_dir():
            raise SurgeryError(f"${ENV_VAR} points to {path}, which is not a folder")
        return path.resolve()
    for candidate in _default_candidates():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def local_file(data_dir: str | os.PathLike | None, relative: str) -> Path | None:
    """``<data dir>/<relative>`` when it exists."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    path = root / relative
    return path if path.exists() else None
