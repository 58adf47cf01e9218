"""The one way this package writes a file or a folder: to a temp path beside it, then rename.

A crash, an error or Ctrl-C never leaves a half-written probe, adapter, model folder or result,
and every file written gets the usual ``0666 & ~umask`` mode (safetensors creates files 0600,
which hides them from the other users of a shared server).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import SurgeryError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Files ``0666 & ~umask``, folders ``0777 & ~umask``, recursively."""
    mask = _umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``target``; write a file or create a folder there.

    On success the result is made readable and renamed onto ``target`` (an existing folder
    there is removed first when ``replace``; an existing file is replaced atomically). On any
    exception the temp path is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        make_readable(tmp)
        if target.is_dir() and not target.is_symlink():
            if not replace:
                raise SurgeryError(f"{target} exists; choose another output path")
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def atomic_write(target: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``target`` atomically."""
    with atomic_path(target) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(target)


def json_safe(value):
    """NaN and infinities are not JSON: a missing value, written as null, everywhere in the tree."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(target: str | os.PathLike, value, indent: int | None = 1) -> Path:
    """``value`` as strict JSON (NaN -> null), UTF-8, written atomically."""
    return atomic_write(
        target, json.dumps(json_safe(value), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    )


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to clobber a non-empty folder unless ``overwrite``; a one-line error names it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SurgeryError(f"{out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise SurgeryError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    return out_dir


def check_free_space(target: str | os.PathLike, needed_bytes: int) -> None:
    """A one-line error, before anything is written, when the disk that will hold ``target`` has
    less than ``needed_bytes`` free."""
    target = Path(target).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise SurgeryError(
            f"not enough disk space for {target}: it needs {_megabytes(needed_bytes)}, "
            f"{existing} has {_megabytes(free)} free"
        )


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
