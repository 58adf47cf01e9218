"""The one way this package writes a file or a folder: claimed, locked, written beside, swapped into place.

What a command writes (a probe, an adapter, a stack, a merged model, an eval run, a comparison) is an
*output* of a kind. :func:`output` is the only writer of outputs:

- **It deletes only what it made.** The target must not be ``""``, ``.``, ``..``, the home folder, the file
  system root, the working folder or one of its parents, nor a symbolic link. An existing target is
  replaced only when it is an output of the same kind (recognised by its manifest, :func:`output_kind`)
  and ``overwrite`` is given; anything else there is refused, with or without ``overwrite`` (an empty
  folder counts as free).
- **Crash-safe.** Everything is written into ``.<name>.tmp-<pid>-<token>`` beside the target and then
  swapped in with one ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames), so ``kill -9`` at
  any point leaves the old output or the new one, whole. Temp folders of dead processes are removed by
  the next write to that place; a temp name is never loaded as an output.
- **One writer at a time.** A lock file ``.<name>.lock`` (``flock``) is held from the claim to the swap: a
  second writer of the same target fails at once, in one line.
- **Readers never see a mix.** Folder outputs end with a manifest (``surgery.json``) written last; it
  lists the sha256 of every file it describes (:func:`manifest_files`), and loaders check them
  (:func:`verify_files`).
- **Full disks** give one line (``no space left``) and no partial output; :func:`check_free_space` is sized
  to the real output.

Every file written gets the usual ``0666 & ~umask`` mode (safetensors creates files 0600, which hides
them from the other users of a shared server).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import SurgeryError

MANIFEST = "surgery.json"  # every folder output's manifest, written last
FAULT_ENV = "SURGERY_FAULT_AT"  # tests: kill this process (SIGKILL) at a named point of a write
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
_NAME_ROOM = 40  # what a temp name adds to the target's name


# ---------------------------------------------------------------------------- what lies at a path


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _safetensors_metadata(path: Path) -> dict | None:
    """The ``__metadata__`` of a safetensors file's header, without loading it (None: not safetensors)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 24:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return header.get("__metadata__") if isinstance(header, dict) else None


def output_kind(path: str | os.PathLike) -> str | None:
    """Which kind of surgery output lies at ``path``: ``probe``, ``adapter``, ``stack``, ``saved_edit``, ``run``,
    ``sweep``, ``compare``, ``demo``, ``tune``, ``merged_model``; None for anything else (or nothing)."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return None
    if path.is_file():
        meta = _safetensors_metadata(path)
        return "probe" if meta and {"model", "layer", "pooling"} <= set(meta) else None
    manifest = _json(path / MANIFEST) or {}
    if isinstance(manifest.get("kind"), str):
        return manifest["kind"]
    if str(manifest.get("format", "")).startswith("surgery_plugin/adapter/"):
        return "adapter"  # written before manifests named their kind
    legacy = {
        "stack.json": "stack",
        "edit.json": "saved_edit",
        "compare.json": "compare",
        "summary.json": "demo",
        "sweep.json": "sweep",
        "study.db": "tune",
        "surgery_source.json": "merged_model",
    }
    for name, kind in legacy.items():
        if (path / name).is_file():
            return kind
    results = _json(path / "results.json")
    if results is not None and "schema_version" in results:
        return "run"
    return None


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


# ---------------------------------------------------------------------------- checking a target


def check_target(target: str | os.PathLike, kind: str, overwrite: bool = False, what: str = "--out") -> Path:
    """The absolute target of a new ``kind`` output, after every check that does not need the lock: a one-line
    error for a path this package must never write or replace (see the module doc)."""
    text = os.fspath(target)
    if not text.strip():
        raise SurgeryError(f"{what} is empty; name a file or folder to write")
    path = Path(os.path.abspath(os.path.expanduser(text)))  # lexical: '..' is resolved, symlinks are not
    parts = Path(text).parts
    if (
        path == Path(path.anchor)
        or path == Path.home()
        or Path.cwd().is_relative_to(path)
        or parts[-1:]
        in (
            (".",),
            ("..",),
        )
    ):
        raise SurgeryError(
            f"{what} {text} is the working folder, one of its parents, the home folder or the root; "
            "name a new file or folder"
        )
    if len(path.name.encode()) + _NAME_ROOM > 255:
        raise SurgeryError(f"{what} {text[:60]}...: the name is too long (at most {255 - _NAME_ROOM} bytes)")
    if path.is_symlink():
        raise SurgeryError(f"{what} {text} is a symbolic link; name a real file or folder (its target is left alone)")
    if path.exists() and not _is_empty_folder(path):
        found = output_kind(path)
        if found != kind:
            shown = f"a surgery output of kind '{found}'" if found else "not a surgery output"
            raise SurgeryError(
                f"{what} {text} exists and is {shown}, not of kind '{kind}'; it is left alone: choose another path"
            )
        if not overwrite:
            raise SurgeryError(f"{what} {text} exists; pass --overwrite to replace it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SurgeryError(f"{what} {text}: {parent} is a file, not a folder")
            break
    return path


# ---------------------------------------------------------------------------- writing


def _fault(point: str) -> None:
    """Tests only: ``SURGERY_FAULT_AT=<point>`` kills this process at that point of a write."""
    if os.environ.get(FAULT_ENV) == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Files ``0666 & ~umask``, folders ``0777 & ~umask``, recursively."""
    mask = _umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Temp files and folders a dead writer left beside ``target``."""
    if not target.parent.is_dir():
        return
    for sibling in target.parent.iterdir():
        match = _TEMP.match(sibling.name)
        if match and match["name"] == target.name and not _alive(int(match["pid"])):
            _remove(sibling)


def is_temp_name(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a writer's temp file or folder (never an output)."""
    return bool(_TEMP.match(Path(path).name))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def _locked(target: Path, what: str) -> Iterator[None]:
    """Hold ``.<name>.lock`` (``flock``) while the block runs; removed when it ends. A lock file that was
    replaced between opening and locking it (its holder finished) is opened again."""
    lock_path = target.with_name(f".{target.name}.lock")
    while True:
        handle = open(lock_path, "a+")  # noqa: SIM115 (held until the swap)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            handle.close()
            raise SurgeryError(
                f"another process is writing {what} {target} (lock {lock_path}); wait for it or choose another path"
            ) from err
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # before the lock is released: a writer that opened it will see it was replaced
        handle.close()


def is_disk_full(err: BaseException) -> bool:
    """A full disk or quota, however the library that wrote reported it (safetensors and SQLite wrap the OS error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text or "database or disk is full" in text


def _disk_error(err: BaseException, target: Path) -> SurgeryError | None:
    if is_disk_full(err):
        return SurgeryError(f"no space left on the device writing {target}; nothing was written")
    if not isinstance(err, OSError):
        return None
    if err.errno == errno.ENAMETOOLONG:
        return SurgeryError(f"{target}: a name is too long for the file system")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SurgeryError(f"cannot write {target}: {os.strerror(err.errno)}")
    return None


def _temp_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _install(tmp: Path, target: Path) -> Path:
    """Put ``tmp`` in ``target``'s place in one step; returns what is left at ``tmp`` to remove (the old output,
    or nothing). A folder swaps with an existing one (``renameat2``); elsewhere: aside, in, then removed."""
    make_readable(tmp)
    _fault("before-swap")
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        if not tmp.is_dir() or not _exchange(tmp, target):
            aside = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(target, aside)
            os.replace(tmp, target)
            return aside
    elif target.exists() and tmp.is_file() and target.is_file():
        if not _exchange(tmp, target):
            os.replace(tmp, target)
    else:
        if target.is_dir() and not target.is_symlink():
            target.rmdir()  # the empty folder that stood there
        os.replace(tmp, target)
    _fault("after-swap")
    return tmp


@contextlib.contextmanager
def _written_beside(target: Path, folder: bool) -> Iterator[Path]:
    """A temp path beside ``target`` (a folder made when ``folder``) that replaces it whole when the block ends
    well, and is removed when it does not; a full disk or a bad name is one line."""
    tmp = _temp_beside(target)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        if not tmp.exists() or (folder and not any(tmp.iterdir())):
            raise RuntimeError(f"nothing was written to {tmp}")
        tmp = _install(tmp, target)
    except Exception as err:
        translated = _disk_error(err, target)
        if translated is None:
            raise
        raise translated from err
    finally:
        _remove(tmp)


@contextlib.contextmanager
def output(
    target: str | os.PathLike, kind: str, overwrite: bool = False, folder: bool = True, what: str = "--out"
) -> Iterator[Path]:
    """Claim ``target`` for a ``kind`` output and yield a temp path to write it into (a folder, already
    made, when ``folder``; else a file path). On success it is swapped into place whole, on any error it
    is removed and ``target`` is as it was. See the module doc for what is refused."""
    path = check_target(target, kind, overwrite, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _disk_error(err, path) or SurgeryError(f"cannot create the folder of {path}: {err}") from err
    with _locked(path, what):
        remove_stale_temps(path)
        path = check_target(path, kind, overwrite, what)  # again, under the lock: another writer may have finished
        with _written_beside(path, folder) as tmp:
            yield tmp


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A write that is not a user-named output (a cache entry, a file inside an output being written): yield a
    temp path beside ``target``; the caller writes a file there, or makes a folder; then it replaces ``target``
    whole (an older file or folder there included). On any error the temp is removed and ``target`` left."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise (_disk_error(err, target) or err) from err
    remove_stale_temps(target)
    with _written_beside(target, folder=False) as tmp:
        yield tmp


def atomic_write(target: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``target`` atomically (not a user-named output: see :func:`output`)."""
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


def json_text(value, indent: int | None = 1) -> str:
    """``value`` as strict JSON (NaN -> null)."""
    return json.dumps(json_safe(value), indent=indent, ensure_ascii=False, allow_nan=False, default=str) + "\n"


def write_json(target: str | os.PathLike, value, indent: int | None = 1) -> Path:
    """``value`` as strict JSON (NaN -> null), UTF-8, written atomically."""
    return atomic_write(target, json_text(value, indent))


# ---------------------------------------------------------------------------- manifests


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_files(folder: str | os.PathLike, names: list[str] | None = None) -> dict[str, str]:
    """``{relative name: sha256}`` of the files a manifest describes (every file in ``folder`` but the manifest)."""
    folder = Path(folder)
    if names is None:
        names = sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
        )
    return {name: file_sha256(folder / name) for name in names}


def seal(record: dict) -> dict:
    """``record`` with ``record_sha256``: the digest of its own canonical JSON, so an edit of the manifest shows."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    digest = hashlib.sha256(json.dumps(json_safe(body), sort_keys=True, default=str).encode()).hexdigest()
    return {**body, "record_sha256": digest}


def write_manifest(folder: str | os.PathLike, record: dict, names: list[str] | None = None) -> dict:
    """Write ``surgery.json`` last: ``record`` + the sha256 of the files it describes, sealed."""
    sealed = seal({**record, "files": manifest_files(folder, names)})
    (Path(folder) / MANIFEST).write_text(json_text(sealed), encoding="utf-8")
    return sealed


def read_manifest(folder: str | os.PathLike, what: str = "output") -> dict:
    """A folder's ``surgery.json``, its seal checked when it has one (a one-line error when edited or corrupt)."""
    path = Path(folder) / MANIFEST
    if is_temp_name(folder):
        raise SurgeryError(f"{folder} is a writer's temporary folder, not an output")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise SurgeryError(f"{folder} has no {MANIFEST}; it is not a surgery {what}") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SurgeryError(f"{path} is corrupt ({err})") from err
    if not isinstance(record, dict):
        raise SurgeryError(f"{path} is corrupt (not a JSON object)")
    if "record_sha256" in record and seal(record)["record_sha256"] != record["record_sha256"]:
        raise SurgeryError(f"{path} was changed after it was written (its seal does not match); remake the {what}")
    return record


def verify_files(folder: str | os.PathLike, record: dict, contents: dict[str, bytes] | None = None) -> None:
    """The files a manifest lists have the digests it records (``contents``: bytes already read, by name)."""
    for name, digest in (record.get("files") or {}).items():
        if contents is not None and name in contents:
            got = hashlib.sha256(contents[name]).hexdigest()
        else:
            try:
                got = file_sha256(Path(folder) / name)
            except FileNotFoundError as err:
                raise SurgeryError(f"{folder} lacks {name}, which its {MANIFEST} lists") from err
        if got != digest:
            raise SurgeryError(f"{Path(folder) / name} does not match its {MANIFEST} (changed or half-replaced)")


def check_free_space(target: str | os.PathLike, needed_bytes: int) -> None:
    """A one-line error, before anything is written, when the disk that will hold ``target`` has
    less than ``needed_bytes`` free."""
    target = Path(target).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise SurgeryError(
            f"not enough disk space for {target}: it needs {needed_bytes / 1e6:.1f} MB, "
            f"{existing} has {free / 1e6:.1f} MB free"
        )
