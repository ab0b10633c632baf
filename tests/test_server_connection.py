"""What proxy/server.py does per connection in place of Hypercorn: the keep-alive
timer (``_KeepAlive``, under MockClock, then through a real server) and the date header."""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from proxy.server import _KeepAlive

from .harness import read_head, weir_and_mock

KEEP_ALIVE = 75.0


class _Events:
    """What the timer drives: Hypercorn's worker context and the connection's close."""

    def __init__(self) -> None:
        self.terminated = trio.Event()
        self.closed_at: float | None = None
        self.config = SimpleNamespace(keep_alive_timeout=KEEP_ALIVE)
        self.context = self

    async def wait(self) -> None:  # hypercorn's EventWrapper.wait
        await self.terminated.wait()

    async def _initiate_server_close(self) -> None:
        self.closed_at = trio.current_time()


async def _timer(nursery: trio.Nursery) -> tuple[_KeepAlive, _Events]:
    events = _Events()
    events.context = SimpleNamespace(terminated=events)  # type: ignore[assignment]
    timer = _KeepAlive(events)  # type: ignore[arg-type]
    await timer.restart(SimpleNamespace(_nursery=nursery), None)  # the connection was accepted
    return timer, events


async def test_idle_connection_closes_after_keep_alive_and_each_request_moves_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        timer, events = await _timer(nursery)
        await trio.sleep(50)
        await timer.stop()  # a request began
        await trio.sleep(500)  # a long request: no timeout while busy
        assert events.closed_at is None
        await timer.restart(None, None)  # answered: idle from now
        started_idle = trio.current_time()
        await trio.sleep(KEEP_ALIVE + 1)
    assert events.closed_at == started_idle + KEEP_ALIVE


async def test_shutdown_closes_an_idle_connection_at_once_and_a_busy_one_when_it_goes_idle(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        idle, idle_events = await _timer(nursery)
        busy, busy_events = await _timer(nursery)
        await busy.stop()
        await trio.sleep(10)
        idle_events.terminated.set()
        busy_events.terminated.set()
        await trio.sleep(1)
        assert idle_events.closed_at == 10
        assert busy_events.closed_at is None  # still answering
        await trio.sleep(20)
        await busy.restart(None, None)
        await trio.sleep(1)
        assert busy_events.closed_at == 31  # the moment it went idle


async def test_a_closed_connection_ends_its_timer_without_acting(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(1):  # the nursery exits: the timer task is gone
        async with trio.open_nursery() as nursery:
            timer, events = await _timer(nursery)
            await trio.sleep(0)
            timer.close()
    assert events.closed_at is None


async def _get_health(stream: trio.SocketStream) -> None:
    await stream.send_all(b"GET /health HTTP/1.1\r\nhost: weir\r\n\r\n")
    got = await read_head(stream)
    assert got is not None and got[0].startswith(b"HTTP/1.1 200"), got
    head, body = got
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += await stream.receive_some(65536)


async def test_real_server_keeps_a_connection_across_requests_then_closes_it_when_idle() -> None:
    """Through Hypercorn: the timer is wired in (a short keep-alive, in real time,
    only to see it act end to end; the timing logic is the MockClock tests above)."""
    async with weir_and_mock(server={"keep_alive_s": 0.3}) as (weir, _):
        port = int(weir.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        for _ in range(5):
            await _get_health(stream)
            await trio.sleep(0.1)  # idle, but less than the keep-alive each time
        with trio.fail_after(5):
            assert await stream.receive_some(65536) == b""  # the server's EOF
        await stream.aclose()


def test_date_header_is_formatted_once_per_second_and_stays_exact() -> None:
    from wsgiref.handlers import format_date_time

    from proxy.server import _DatePerSecond

    date = _DatePerSecond()
    for ts in (1_700_000_000.0, 1_700_000_000.4, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_065.5):
        assert date(ts) == format_date_time(int(ts))


def _server_h11() -> "h11.Connection":
    import h11

    from proxy.server import _LastRequestH11

    conn = _LastRequestH11(h11.SERVER)
    conn.receive_data(b"GET /v1/models HTTP/1.1\r\nhost: weir\r\n\r\n")
    assert type(conn.next_event()) is h11.Request and type(conn.next_event()) is h11.EndOfMessage
    return conn


def test_a_content_length_reply_leaves_in_one_write_with_its_body() -> None:
    import h11

    conn = _server_h11()
    assert conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"2")])) == b""
    out = conn.send(h11.Data(data=b"ok"))
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nok")
    assert conn.send(h11.EndOfMessage()) == b""


def test_a_bodiless_reply_still_sends_its_head_and_a_stream_is_not_held() -> None:
    import h11

    conn = _server_h11()
    assert conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")])) == b""
    assert conn.send(h11.EndOfMessage()).startswith(b"HTTP/1.1 200 ")  # the head, at the end of the message
    conn.start_next_cycle()
    conn.receive_data(b"GET /v1/models HTTP/1.1\r\nhost: weir\r\n\r\n")
    conn.next_event(), conn.next_event()
    head = conn.send(h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")]))
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()  # written at once
