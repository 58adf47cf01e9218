"""The one cache root: dequantised embedded models, judged self-continuations, trained judge heads.

``$SURGERY_CACHE``, else ``$XDG_CACHE_HOME/surgery_plugin``, else ``~/.cache/surgery_plugin``. Every
writer asks :func:`cache_path` for its place, which creates the folders on first use (a new machine
has none) and names the root and ``SURGERY_CACHE`` in one line when they cannot be made or written.
Entries are written atomically (:func:`surgery_plugin.io.files.atomic_path`) under a key that names
everything they depend on, so an entry is either whole and right, or absent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import SurgeryError, first_line

ENV_VAR = "SURGERY_CACHE"


def cache_root() -> Path:
    """The cache root, created (with its parents) when missing, and checked to be writable."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        root = Path(configured).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base).expanduser() / "surgery_plugin"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise SurgeryError(
            f"the cache folder {root} cannot be created or written ({first_line(err)}); "
            f"set {ENV_VAR} to a writable folder"
        ) from err
    return root


def cache_path(*parts: str) -> Path:
    """``<cache root>/<parts...>``, its parent folder created."""
    path = cache_root().joinpath(*parts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SurgeryError(
            f"the cache folder {path.parent} cannot be created ({first_line(err)}); set {ENV_VAR} to a writable folder"
        ) from err
    return path
