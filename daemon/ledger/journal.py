"""The ledger's local journal: where billed rows wait while the database cannot take them.

An append-only directory of segment files, one JSON array per line (a row as
``usage_row`` lays it out, with its ``row_id``). Each writer (one per worker process)
appends only to its own segments, named ``<writer>.s<seq>.jsonl``, and holds an
exclusive ``flock`` on ``<writer>.lock`` for its lifetime. The kernel releases that lock
however the process ends (SIGKILL, OOM kill), so a writer starting later can tell a
dead writer's segments from a live one's: it takes the dead writer's lock, renames its
segments into its own name (``<writer>.r<seq>.jsonl``, replayed first), and replays
them. Replaying is safe to repeat because inserts are idempotent by ``row_id``: a crash
in the middle of a replay means some rows are offered to the database twice, and
stored once.

Lines go to the kernel with one ``os.write`` each batch, so they survive the process
being killed; ``sync`` (an fsync, run off the event loop about once a second while
the journal is in use) makes them survive a power cut too. The journal is bounded by
``max_bytes``; past it, rows are refused and the caller counts them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from daemon.ledger.base import usage_from_row, usage_row
from daemon.usage import Usage

log = logging.getLogger("chatvault.ledger")

SEGMENT_BYTES = 16 * 1024 * 1024
_READ_CHUNK = 4 * 1024 * 1024


@dataclass(slots=True)
class Segment:
    path: Path
    recovered: bool  # left by an earlier process
    size: int = 0  # bytes on disk
    pos: int = 0  # bytes already replayed (and committed to the database)
    rows: int = 0  # rows not yet replayed


@dataclass(slots=True)
class Chunk:
    """Rows read from the head segment; ``Journal.commit`` moves past them."""

    rows: list[Usage]
    segment: Segment | None
    end: int
    lines: int
    corrupt: int = 0
    ids: list[str] = field(default_factory=list)


class JournalError(Exception):
    """The journal cannot be used (directory not writable, disk full...)."""


class Journal:
    def __init__(
        self, directory: Path, *, max_bytes: int, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.writer_id = f"{os.getpid()}-{random.getrandbits(32):08x}"
        self._segments: deque[Segment] = deque()
        self._active: Segment | None = None
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._seq = 0
        self._dirty = False
        self.rows_recovered = 0  # rows found from earlier processes at open
        self.rows_corrupt = 0  # unreadable lines skipped (a torn last write)

    # -- lifetime ---------------------------------------------------------------------

    def open(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self._lock_path(self.writer_id), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._adopt_orphans()
        except OSError as exc:
            self.close()
            raise JournalError(f"journal {self.directory}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Release the directory; unreplayed segments stay for the next process."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._active = None
        if self._lock_fd is not None:
            if not self._segments:
                with contextlib.suppress(OSError):
                    os.unlink(self._lock_path(self.writer_id))
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- state --------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Rows waiting to be replayed."""
        return sum(s.rows for s in self._segments)

    @property
    def pending_bytes(self) -> int:
        return sum(s.size - s.pos for s in self._segments)

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    @property
    def empty(self) -> bool:
        return not self._segments

    # -- appending ----------------------------------------------------------------------

    def append(self, rows: Sequence[Usage]) -> int:
        """Append ``rows`` in order; returns how many fit (the rest: journal full).
        Raises JournalError when the disk refuses the write (nothing is half-written)."""
        if not rows:
            return 0
        room = self.max_bytes - self.disk_bytes
        lines = []
        size = 0
        for u in rows:
            line = orjson.dumps(usage_row(u)) + b"\n"
            if size + len(line) > room:
                break
            lines.append(line)
            size += len(line)
        if not lines:
            return 0
        segment = self._writable_segment()
        data = b"".join(lines)
        assert self._fd is not None
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            # Cut the partial write back off, so the file holds only whole lines.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, segment.size)
            raise JournalError(f"journal {segment.path}: {exc.strerror or exc}") from None
        segment.size += len(data)
        segment.rows += len(lines)
        self._dirty = True
        if segment.size >= self.segment_bytes:
            self._seal()
        return len(lines)

    def sync(self) -> None:
        """fsync what was appended (blocking: call it off the event loop)."""
        fd = self._fd
        if fd is not None and self._dirty:
            self._dirty = False
            with contextlib.suppress(OSError):
                os.fsync(fd)

    def _writable_segment(self) -> Segment:
        if self._active is not None:
            return self._active
        self._seq += 1
        path = self.directory / f"{self.writer_id}.s{self._seq:08d}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active = Segment(path, recovered=False)
        self._segments.append(self._active)
        return self._active

    def _seal(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        self._active = None

    # -- replaying ----------------------------------------------------------------------

    def read(self, limit: int) -> Chunk:
        """Up to ``limit`` rows from the head, oldest first (empty: nothing to replay)."""
        while self._segments:
            segment = self._segments[0]
            if segment.pos >= segment.size:
                if segment is self._active:
                    self._seal()
                self._drop_head()
                continue
            with open(segment.path, "rb") as f:
                f.seek(segment.pos)
                data = f.read(_READ_CHUNK)
            rows: list[Usage] = []
            consumed = corrupt = lines = 0
            start = 0
            while len(rows) < limit:
                end = data.find(b"\n", start)
                if end < 0:
                    break
                line = data[start:end]
                start = end + 1
                consumed = start
                lines += 1
                try:
                    rows.append(usage_from_row(orjson.loads(line), recovered=segment.recovered))
                except (orjson.JSONDecodeError, TypeError, ValueError):
                    corrupt += 1
            if lines == 0:
                if segment is self._active:
                    return Chunk([], None, 0, 0)
                # A dead writer's last line, cut off mid-write: nothing more to read.
                log.warning("journal %s: %d torn bytes at the end skipped", segment.path, len(data))
                self.rows_corrupt += 1
                self._drop_head()
                continue
            return Chunk(rows, segment, segment.pos + consumed, lines, corrupt)
        return Chunk([], None, 0, 0)

    def commit(self, chunk: Chunk) -> None:
        """The chunk's rows are in the database: move past them for good."""
        segment = chunk.segment
        if segment is None:
            return
        segment.pos = chunk.end
        segment.rows = max(segment.rows - chunk.lines, 0)
        self.rows_corrupt += chunk.corrupt
        if segment.pos >= segment.size:
            if segment is self._active:
                self._seal()
            self._drop_head()

    def _drop_head(self) -> None:
        segment = self._segments.popleft()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment.path)

    # -- recovery -----------------------------------------------------------------------

    def _lock_path(self, writer_id: str) -> Path:
        return self.directory / f"{writer_id}.lock"

    def _adopt_orphans(self) -> None:
        """Take over the segments of writers that are gone (their lock is free)."""
        others: dict[str, list[Path]] = {}
        for path in self.directory.iterdir():
            writer, _, rest = path.name.partition(".")
            if writer == self.writer_id or not rest:
                continue
            segments = others.setdefault(writer, [])
            if rest.endswith(".jsonl"):
                segments.append(path)
        adopted = 0
        for writer, paths in sorted(others.items()):
            lock_path = self._lock_path(writer)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive: its writer replays its own journal
                # Listed before we held the lock: only what is still there is ours now.
                for path in sorted(paths, key=_segment_order):
                    adopted += 1
                    target = self.directory / f"{self.writer_id}.r{adopted:08d}.jsonl"
                    try:
                        os.rename(path, target)
                    except FileNotFoundError:
                        continue  # another starting writer took it first
                    self._segments.append(_load_segment(target))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
            finally:
                os.close(fd)
        self.rows_recovered = self.depth
        if self.rows_recovered:
            log.warning(
                "ledger journal: %d rows left by an earlier process, replaying",
                self.rows_recovered,
            )


def _segment_order(path: Path) -> tuple[str, str]:
    # Within one writer: recovered segments (r...) before its own (s...), by number.
    return ("", path.name.split(".")[1])


def _load_segment(path: Path) -> Segment:
    size = path.stat().st_size
    rows = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_CHUNK):
            rows += block.count(b"\n")
    return Segment(path, recovered=True, size=size, rows=rows)


def describe(journal: Journal | None) -> dict[str, Any]:
    """The journal's state, for logs and the health report."""
    if journal is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "directory": str(journal.directory),
        "depth": journal.depth,
        "bytes": journal.pending_bytes,
        "max_bytes": journal.max_bytes,
    }
