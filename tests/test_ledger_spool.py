"""The spool: batches survive in order, torn tails are cut, segments are shared safely."""

from __future__ import annotations

import errno
import os

import pytest

from proxy.ledger.row import Bodies, DeadLetter, LedgerRow
from proxy.ledger.spool import Spool, SpoolFull


def rows(start: int, n: int) -> list[LedgerRow]:
    return [LedgerRow(request_id=f"r{i}", started_at=i, tenant="t", bodies=Bodies(request=b"\x00\xff") if i == start else None) for i in range(start, start + n)]


def replay(spool: Spool) -> list[str]:
    out = []
    for name in spool.segments():
        seg = spool.take(name)
        assert seg is not None
        out += [r.request_id for b in seg.batches() for r in b]
        seg.done()
    return out


def test_batches_come_back_in_order_across_segments(tmp_path):
    s = Spool(str(tmp_path))
    s.append(rows(0, 3))
    s.append(rows(3, 2))
    s.close_segment()
    s.append(rows(5, 1))
    s.close_segment()
    assert len(s.segments()) == 2
    assert replay(s) == [f"r{i}" for i in range(6)]
    assert s.segments() == [] and not s.pending()


def test_rows_keep_their_extras(tmp_path):
    s = Spool(str(tmp_path))
    dl = DeadLetter(method="POST", path="/v1/messages", headers=[("a", "b")], body=b"{}")
    s.append([LedgerRow(request_id="x", started_at=1, bodies=Bodies(request=b"q", response=b"a"), dead_letter=dl)])
    s.close_segment()
    seg = s.take(s.segments()[0])
    (got,) = [r for b in seg.batches() for r in b]
    assert got.bodies == Bodies(request=b"q", response=b"a") and got.dead_letter == dl


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_torn_last_record_is_cut_and_counted(tmp_path, damage):
    s = Spool(str(tmp_path))
    s.append(rows(0, 2))
    s.append(rows(2, 2))
    s.close_segment()
    (name,) = s.segments()
    path = os.path.join(str(tmp_path), name)
    data = open(path, "rb").read()
    if damage == "truncate":
        data = data[:-5]  # kill -9 in the middle of the second write
    else:
        data = data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:]
    open(path, "wb").write(data)
    assert replay(s) == ["r0", "r1"]
    assert s.torn == 1


def test_the_segment_being_written_is_not_replayed_by_another_worker(tmp_path):
    writer = Spool(str(tmp_path))
    writer.append(rows(0, 1))
    other = Spool(str(tmp_path))
    (name,) = other.segments()
    assert other.take(name) is None  # locked by its writer
    writer.close_segment()
    seg = other.take(name)
    assert seg is not None
    assert writer.take(name) is None  # and now locked by the replayer
    seg.done()
    assert other.segments() == []


def test_an_empty_segment_leaves_no_file(tmp_path):
    s = Spool(str(tmp_path))
    s._open_segment()
    s.close_segment()
    assert os.listdir(tmp_path) == []


def test_a_full_disk_raises_spool_full_and_leaves_no_half_record(tmp_path, monkeypatch):
    s = Spool(str(tmp_path))
    s.append(rows(0, 1))
    real_write = os.write

    def full(fd, data):
        real_write(fd, data[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SpoolFull):
        s.append(rows(1, 1))
    monkeypatch.setattr(os, "write", real_write)
    s.append(rows(2, 1))
    s.close_segment()
    assert replay(s) == ["r0", "r2"] and s.torn == 0
