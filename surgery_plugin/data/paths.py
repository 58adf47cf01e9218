"""Where the local data folder is: ``--data-dir``, then ``$SURGERY_DATA_DIR``, then ``../shared/data``.

``../shared/data`` is looked for beside the working directory and, in a source checkout, beside
the checkout. An installed package with neither finds no folder, and the loaders fall back to
the public hub copies.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SurgeryError

ENV_VAR = "SURGERY_DATA_DIR"


def _default_candidates() -> list[Path]:
    candidates = [Path.cwd() / ".." / "shared" / "data"]
    checkout = Path(__file__).resolve().parents[2]  # <checkout>/surgery_plugin/data/paths.py
    if (checkout / "pyproject.toml").is_file():
        candidates.append(checkout / ".." / "shared" / "data")
    return candidates


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
