"""The generation batches an arm has finished, kept as it measures, so an interrupted arm resumes mid-way.

:class:`.arms.ArmStore` keeps whole arms; one sampled arm on this project's CPUs takes up to an hour, so a run
stopped inside an arm used to lose that arm's work. While an arm is measured, :func:`journal` makes a
:class:`BatchJournal` the active one, and :func:`.generation.generate_continuations` appends each batch it
finishes (its continuations and, where asked, their token ids) to ``<out>.arms/<arm>.journal.jsonl``.

Measuring an arm is deterministic: the same model, prompts, seeds and settings run the same batches in the same
order. So the journal is *positional*: on a rerun, the batch at position n is taken from the journal's n-th
entry when that entry was made for the same inputs (its key: the batch's token ids, sample seeds and decoding
settings) and generated otherwise, after which the rest of the journal is dropped. The key guards the order;
the arm's fingerprint in the journal's first line guards what the key does not see (the model, its adapter,
the suite's judges, the library versions): a journal of another fingerprint is ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..io.files import atomic_write, json_text

logger = logging.getLogger(__name__)

JOURNAL_KIND = "batch_journal"
JOURNAL_SUFFIX = ".journal.jsonl"

_ACTIVE: ContextVar[BatchJournal | None] = ContextVar("surgery_batch_journal", default=None)


def batch_key(rows: Sequence[Sequence[int]], **decoding) -> str:
    """What decides a generation batch's output besides the model: its rows' token ids and the decoding settings
    (sample seeds, token budget, nucleus, stop rule)."""
    text = json.dumps({"rows": [list(map(int, r)) for r in rows], **decoding}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class BatchJournal:
    """One arm's finished batches, in the order they were generated, on disk as JSON lines."""

    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = Path(path)
        self.header = {"kind": JOURNAL_KIND, **header}
        self.entries = self._read()
        self.position = 0  # batches asked for so far in this run
        self.replayed = 0
        self._written = False  # whether the file holds exactly the header and ``entries`` (see :meth:`record`)

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        entries: list[dict] = []
        try:
            with open(self.path, encoding="utf-8") as f:
                if json.loads(f.readline()) != self.header:
                    logger.info("%s was written for other settings; measuring the arm from its start", self.path)
                    return []
                for line in f:
                    entry = json.loads(line)  # a last line cut short by a crash ends the journal
                    entries.append(entry)
        except (OSError, ValueError):
            pass
        return entries

    def replay(self, key: str) -> dict | None:
        """The kept entry (``texts``, ``ids``) of the next batch when it was made for these inputs, else ``None``
        (and, where the journal holds a different batch here, the journal is cut at this point)."""
        if self.position < len(self.entries):
            entry = self.entries[self.position]
            if entry.get("key") == key:
                self.position += 1
                self.replayed += 1
                return entry
            logger.info("%s: batch %d differs from the kept one; generating from here", self.path, self.position)
            del self.entries[self.position :]
            self._written = False
        return None

    def record(self, key: str, texts: list[str], ids: list | None) -> None:
        """Append a finished batch (flushed to disk before the next batch starts)."""
        entry = {"key": key, "texts": texts, "ids": ids}
        if not self._written:  # first written batch: rewrite the journal without a line a crash cut short (or
            # the ones after a divergence); an arm that generates nothing leaves no file
            lines = (json_text(x, indent=None) for x in [self.header, *self.entries])
            atomic_write(self.path, "".join(lines))
            self._written = True
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json_text(entry, indent=None))
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)
        self.position += 1


def active_journal() -> BatchJournal | None:
    """The journal of the arm being measured, if any: generation keeps its batches there."""
    return _ACTIVE.get()


@contextmanager
def journal(path: str | os.PathLike, header: dict) -> Iterator[BatchJournal]:
    """Make a journal at ``path`` (for the arm described by ``header``) the active one while the block runs; the
    caller removes it once the arm itself is kept."""
    kept = BatchJournal(path, header)
    token = _ACTIVE.set(kept)
    try:
        yield kept
    finally:
        _ACTIVE.reset(token)
        if kept.replayed:
            logger.info("%s: %d generation batches taken from the interrupted run", kept.path.name, kept.replayed)


def is_journal(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a journal this module wrote (its first line says so)."""
    path = Path(path)
    if not path.name.endswith(JOURNAL_SUFFIX) or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline()).get("kind") == JOURNAL_KIND
    except (OSError, ValueError, AttributeError):
        return False
