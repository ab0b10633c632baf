"""The ledger's append-only local spool: rows the database has not taken yet.

When the database is unreachable or slower than the traffic, the writer
appends each batch here instead of holding it in memory (bounded) or dropping
it (LiteLLM's deque, Bifrost's failed batch). Once the database answers
again the writer replays the spool oldest first; rows are idempotent by
request id, so a batch replayed twice (a crash between the database's commit
and the segment's removal, two workers replaying one orphan) is stored once.

Layout: ``<dir>/<time_ns>-<pid>.seg`` segment files, names sorting in the
order they were started. A segment is a run of records::

    u32 length | u32 crc32(payload) | payload (msgpack list of LedgerRow)

one record per batch, written with one ``write`` and ``fsync``ed before the
batch counts as kept. A record torn by a crash fails its length or CRC check;
reading stops there and the torn tail is counted, not guessed at.

Sharing: every worker on a host shares one data directory. A writer holds
``flock(LOCK_EX)`` on the segment it appends to; a replayer takes the same
lock (non-blocking) on a closed segment before reading it, so no segment is
replayed while being written, and segments left by a process that died
(``kill -9``) are picked up by whichever worker gets there first.

Blocking file I/O: every method here is synchronous and runs in a worker
thread (``trio.to_thread``) under the writer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
import zlib
from collections.abc import Iterator

import msgspec

from .row import LedgerRow

__all__ = ["Spool", "SpoolFull"]

_HEADER = struct.Struct("<II")
# A segment is closed and a new one started past this size, so replay can
# delete what it finished without rewriting anything.
_SEGMENT_BYTES = 16 * 1024 * 1024
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[LedgerRow])


class SpoolFull(Exception):
    """The disk refused the batch (ENOSPC, EDQUOT): the only way rows are lost."""


class Spool:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._fd: int | None = None
        self._name = ""
        self._size = 0
        self.torn = 0  # records found cut short by a crash
        self.appended = 0  # rows

    # -- writing -------------------------------------------------------------

    def append(self, rows: list[LedgerRow]) -> None:
        """Persist one batch; returns once it is on disk (fsync)."""
        payload = _encoder.encode(rows)
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        if self._fd is None or self._size >= _SEGMENT_BYTES:
            self._open_segment()
        assert self._fd is not None
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(self._fd)
        except OSError as exc:
            # Leave no half record behind: cut the file back to the last whole one.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(str(exc)) from exc
            raise
        self._size += len(record)
        self.appended += len(rows)

    def _open_segment(self) -> None:
        self.close_segment()
        name = f"{time.time_ns():020d}-{os.getpid()}.seg"
        fd = os.open(os.path.join(self.dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd, self._name, self._size = fd, name, 0
        _fsync_dir(self.dir)  # the new name survives a crash too

    def close_segment(self) -> None:
        """Stop appending to the current segment, so it can be replayed."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # releases the lock
            if self._size == 0:
                _unlink(os.path.join(self.dir, self._name))
            self._name, self._size = "", 0

    # -- replaying -----------------------------------------------------------

    def segments(self) -> list[str]:
        """Closed segments in the order they were started (ours in progress excluded)."""
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".seg"))
        except FileNotFoundError:
            return []
        return [n for n in names if n != self._name]

    def open_rows(self) -> bool:
        """The segment being appended to holds at least one batch."""
        return self._fd is not None and self._size > 0

    def pending(self) -> bool:
        return self._fd is not None and self._size > 0 or bool(self.segments())

    def take(self, name: str) -> Segment | None:
        """Lock a closed segment for replay; None if someone else holds it or it is gone."""
        path = os.path.join(self.dir, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # Another replayer may have finished and removed it between our open and lock.
        if not os.path.exists(path):
            os.close(fd)
            return None
        return Segment(self, path, fd)

    def close(self) -> None:
        self.close_segment()


class Segment:
    """One locked segment being replayed: read its batches, then ``done()``."""

    def __init__(self, spool: Spool, path: str, fd: int) -> None:
        self._spool = spool
        self.path = path
        self._fd = fd

    def batches(self) -> Iterator[list[LedgerRow]]:
        with os.fdopen(os.dup(self._fd), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            if len(data) - pos < _HEADER.size:
                self._spool.torn += 1
                return
            length, crc = _HEADER.unpack_from(data, pos)
            payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                self._spool.torn += 1
                return
            pos += _HEADER.size + length
            try:
                yield _decoder.decode(payload)
            except msgspec.DecodeError:
                self._spool.torn += 1
                return

    def done(self) -> None:
        """Every batch is in the database: remove the segment."""
        _unlink(self.path)
        _fsync_dir(self._spool.dir)
        self.release()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
