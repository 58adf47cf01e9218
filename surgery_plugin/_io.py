"""File-writing details shared by the modules that save artefacts."""

from __future__ import annotations

import os
from pathlib import Path


def make_readable(path: str | os.PathLike) -> None:
    """Give a written file the usual ``0666 & ~umask`` mode: safetensors creates files 0600,
    which hides probes and adapters from the other users of a shared server."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def make_tree_readable(folder: str | os.PathLike) -> None:
    for path in Path(folder).rglob("*"):
        if path.is_file():
            make_readable(path)
