"""Finished arms of a long paired run, kept so an interrupted run resumes where it stopped.

A paired evaluation with controls is several arms (the unedited model, the edit, N null edits) of the same
prompts and seeds; on a CPU one sampled arm takes up to half an hour. :class:`ArmStore` writes each finished arm
(its ``results.json`` and ``samples.jsonl``) into ``<out>.arms/<arm>/`` beside the run's ``--out`` and, when the
same command runs again, reads back every arm whose *fingerprint* matches instead of measuring it again. The
fingerprint is a digest of everything that decides an arm's rows: the model, the adapter's files, each suite's
settings and judges, the package's version and the arm's name (a control's seed). An arm whose fingerprint
differs is measured again and replaced, and so is one kept under other library versions (torch, transformers,
PEFT, safetensors, Python: recorded beside the fingerprint, since a new torch can change the rows). When the
run's output is written whole, :meth:`ArmStore.discard` removes the store: its arms are in the output. Inside an
arm, :meth:`ArmStore.journal` keeps each generation batch as it finishes (:mod:`.journal`), so a run stopped
mid-arm resumes that arm from its last finished batch. :meth:`ArmStore.adopt` copies an arm with this run's
fingerprint from another run's store (a comparison split over processes: ``surgery compare --reuse``).

The store deletes only what it wrote: a folder at ``<out>.arms`` without the store's marker is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.provenance import package_versions
from ..errors import SurgeryError
from ..io.files import (
    MANIFEST,
    atomic_path,
    atomic_write,
    json_text,
    manifest_files,
    read_manifest,
    seal,
    verify_files,
    write_manifest,
)
from .journal import JOURNAL_SUFFIX, BatchJournal, is_journal
from .journal import journal as batch_journal
from .runner import write_run_files

logger = logging.getLogger(__name__)

STORE_KIND = "paired_arms"
STORE_SUFFIX = ".arms"
ARM_KIND = "arm"

Measure = Callable[[], tuple[dict, list[dict]]]


def folder_digest(folder: str | os.PathLike) -> str:
    """One sha256 over the names and contents of every file in ``folder`` (its manifest included)."""
    folder = Path(folder)
    files = manifest_files(folder, sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()))
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def fingerprint(record: dict) -> str:
    """The digest of a JSON-able description of an arm: the canonical-JSON digest manifests are sealed with."""
    return seal(record)["record_sha256"]


def paired_run_identity(model: str | None, dtype: str, adapter: str | os.PathLike | None, settings: dict) -> dict:
    """What every arm of one paired run shares: the model, the adapter's files, each suite's settings and judges."""
    return {
        "model": model,
        "dtype": dtype,
        "adapter": folder_digest(adapter) if adapter and Path(adapter).is_dir() else adapter,
        "settings": {
            suite: {**s.describe(), "judges": [j.name for j in s.judges], "data_dir": str(s.data_dir)}
            for suite, s in settings.items()
        },
        "version": package_versions()["surgery_plugin"],
    }


def changed_versions(kept: dict | None) -> str:
    """The libraries whose version differs from the one an arm was measured with, as ``name a -> b``; empty when
    none does. Arms kept before versions were recorded carry none and are taken as they are."""
    if not kept:
        return ""
    now = package_versions()
    return ", ".join(f"{name} {kept[name]} -> {now.get(name)}" for name in sorted(kept) if kept[name] != now.get(name))


def read_arm(folder: Path) -> tuple[dict, list[dict]]:
    """``results.json`` and ``samples.jsonl`` of a kept arm (:func:`.runner.write_run_files`)."""
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    return results, read_samples(folder / "samples.jsonl")


def read_samples(path: Path) -> list[dict]:
    """The rows of a ``samples.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def store_folder(out: str | os.PathLike) -> Path:
    """Where the run whose output is ``out`` keeps its finished arms: ``<out>.arms`` beside it (absolute)."""
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    return out.with_name(f"{out.name}{STORE_SUFFIX}")


def is_store(folder: Path) -> bool:
    """Whether ``folder`` is a store of finished arms (it holds the store's marker)."""
    try:
        return read_manifest(folder, "store of finished arms").get("kind") == STORE_KIND
    except SurgeryError:
        return False


class ArmStore:
    """``<out>.arms/``: one folder per finished arm, each with a manifest holding its fingerprint."""

    def __init__(self, out: str | os.PathLike, run: dict, arms: dict[str, dict] | None = None):
        self.folder = store_folder(out)
        self.run = run  # what every arm of this run shares (model, adapter digest, settings, version)
        # what one arm alone depends on (a baseline's hyperparameters): adding or dropping another arm's method
        # from the run leaves this arm's fingerprint, so a finished arm is reused by a run with more methods
        self.arms = arms or {}
        if self.folder.exists() and not is_store(self.folder):
            raise SurgeryError(
                f"{self.folder} exists and is not a store of finished arms (of a paired run or a comparison); it is "
                "left alone: move it or choose another --out"
            )

    def key(self, arm: str) -> str:
        """``arm``'s fingerprint in this run: an arm kept under another one was measured differently."""
        own = self.arms.get(arm)
        return fingerprint({**self.run, "arm": arm, **({"arm_identity": own} if own is not None else {})})

    def _unusable(self, folder: Path, arm: str) -> str | None:
        """Why the kept ``arm`` in ``folder`` cannot stand for this run's (None: it can)."""
        try:
            record = read_manifest(folder, "finished arm")
            if record.get("kind") != ARM_KIND or record.get("fingerprint") != self.key(arm):
                return "it was measured with other settings"
            changed = changed_versions(record.get("versions"))
            if changed:
                return f"it was measured with {changed}"
            verify_files(folder, record)
        except SurgeryError as err:
            return f"it is damaged ({err})"
        return None

    def finished(self, arm: str) -> Path | None:
        """The folder of ``arm`` when the store holds it, finished by this run (same fingerprint) and intact."""
        folder = self.folder / arm
        if not folder.exists():
            return None
        why = self._unusable(folder, arm)
        if why:
            logger.info("arm %s: the stored one is not this run's (%s); measuring it again", arm, why)
            return None
        logger.info("arm %s: reusing the finished arm in %s", arm, folder)
        return folder

    def adopt(self, arm: str, other: str | os.PathLike) -> bool:
        """Copy ``arm`` from ``other``, another run's store, when it is finished there with this run's fingerprint
        (the same run split over processes); ``other`` is only read."""
        folder = Path(other) / arm
        if not folder.is_dir() or Path(other).resolve() == self.folder.resolve():
            return False
        why = self._unusable(folder, arm)
        if why:
            logger.info("arm %s in %s not taken: %s", arm, other, why)
            return False

        def copy(tmp: Path) -> None:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST:
                    (tmp / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, tmp / path.relative_to(folder))

        self.keep(arm, copy)
        return True

    def _open(self) -> None:
        if not is_store(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / MANIFEST, json_text({"kind": STORE_KIND, "run": self.run}))

    @contextmanager
    def journal(self, arm: str) -> Iterator[BatchJournal]:
        """While ``arm`` is measured, its finished generation batches are kept in ``<arm>.journal.jsonl`` and,
        after an interruption, read back (:mod:`.journal`); :meth:`keep` removes the journal with the arm kept."""
        self._open()
        header = {"arm": arm, "fingerprint": self.key(arm), "versions": package_versions()}
        with batch_journal(self.folder / f"{arm}{JOURNAL_SUFFIX}", header) as kept:
            yield kept

    def keep(self, arm: str, write: Callable[[Path], None]) -> Path:
        """Store ``arm``: ``write(folder)`` fills a new folder, the manifest with its fingerprint comes last, and the
        folder replaces an older one of that name whole (a crash leaves the old one or nothing)."""
        self._open()
        with atomic_path(self.folder / arm) as tmp:
            tmp.mkdir()
            write(tmp)
            write_manifest(
                tmp, {"kind": ARM_KIND, "arm": arm, "fingerprint": self.key(arm), "versions": package_versions()}
            )
        (self.folder / f"{arm}{JOURNAL_SUFFIX}").unlink(missing_ok=True)  # the arm holds its batches now
        logger.info("arm %s: finished; kept in %s until the run is written (rerun to resume)", arm, self.folder / arm)
        return self.folder / arm

    def arm(self, arm: str, measure: Measure) -> tuple[dict, list[dict]]:
        """``(results, samples)`` of an evaluation arm: read back when the store holds it, else measured by
        ``measure()`` and kept before it is returned."""
        folder = self.finished(arm)
        if folder is not None:
            try:
                return read_arm(folder)
            except (OSError, ValueError) as err:
                logger.info("arm %s: unreadable (%s); measuring it again", arm, err)
        with self.journal(arm):
            results, samples = measure()
        self.keep(arm, lambda tmp: write_run_files(tmp, results, samples, report=False))
        return results, samples

    def discard(self) -> None:
        """Remove the store once the run's output holds its arms: only the arm folders and marker it wrote."""
        if not is_store(self.folder):
            return
        for child in self.folder.iterdir():
            try:
                ours = child.is_dir() and read_manifest(child, "finished arm").get("kind") == ARM_KIND
            except SurgeryError:
                ours = False
            if ours:
                shutil.rmtree(child)
            elif is_journal(child):  # an arm's batches, left by a measurement that failed
                child.unlink()
        (self.folder / MANIFEST).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # something else was put there: left alone
            logger.warning("%s holds files this run did not write; left in place", self.folder)
