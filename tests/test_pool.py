"""The upstream connection pool against real sockets: reuse, staleness, framing."""

from __future__ import annotations

import ssl

import pytest
import trio
import trustme

from proxy.upstream import pool as pool_module
from proxy.upstream.base import UpstreamError
from proxy.upstream.pool import ConnectionPool

from .harness import body, closed_port, read_head, running_mock


async def _collect(resp) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join([c async for c in resp.aiter()])


async def test_connections_are_reused_for_sequential_requests() -> None:
    async with running_mock() as (mock, url):
        pool = ConnectionPool(url, connect_timeout=5, keepalive_expiry=50)
        for _ in range(5):
            resp = await pool.request(b"POST", b"/v1/messages", [(b"x-api-key", b"k")], body())
            assert resp.status == 200
            assert (await _collect(resp)).startswith(b'{"id":"msg_mock_')
            pool.release(resp)
        assert pool.opened == 1 and mock.connections == 1
        await pool.aclose()


async def test_abandoned_response_closes_its_connection() -> None:
    async with running_mock() as (mock, url):
        pool = ConnectionPool(url, connect_timeout=5, keepalive_expiry=50)
        resp = await pool.request(b"POST", b"/v1/messages", [(b"x-mock-fault", b"hang_after=2")], body(stream=True))
        async for _ in resp.aiter():
            break  # the client gave up mid-stream
        pool.release(resp)
        assert pool.idle == 0  # mid-message: never back in the pool
        with trio.fail_after(5):
            await mock.wait_disconnect(1)


async def _closing_server(accepted: list[int], task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answers one request per connection, keep-alive promised, then closes at once."""

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(1)
        if await read_head(stream) is None:
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_idle_connection_closed_by_upstream_is_detected_before_reuse() -> None:
    accepted: list[int] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_closing_server, accepted)
        pool = ConnectionPool(f"http://127.0.0.1:{port}", connect_timeout=5, keepalive_expiry=50)
        for _ in range(3):
            resp = await pool.request(b"GET", b"/", [], b"")
            assert await _collect(resp) == b"ok"
            pool.release(resp)
            await trio.sleep(0.05)  # let the server's close land
        assert len(accepted) == 3
        nursery.cancel_scope.cancel()


async def test_stale_connection_is_retried_once_on_a_fresh_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # The close races the readability check: the request goes out on a dead
    # connection, sees no response byte, and is sent once more, fresh.
    monkeypatch.setattr(pool_module, "_readable", lambda sock: False)
    accepted: list[int] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_closing_server, accepted)
        pool = ConnectionPool(f"http://127.0.0.1:{port}", connect_timeout=5, keepalive_expiry=50)
        resp = await pool.request(b"GET", b"/", [], b"")
        assert await _collect(resp) == b"ok"
        pool.release(resp)
        await trio.sleep(0.05)
        resp = await pool.request(b"GET", b"/", [], b"")  # the pooled one is dead by now
        assert await _collect(resp) == b"ok"
        assert len(accepted) == 2 and pool.opened == 2
        nursery.cancel_scope.cancel()


async def test_refused_connection_is_a_connect_error() -> None:
    pool = ConnectionPool(f"http://127.0.0.1:{closed_port()}", connect_timeout=5, keepalive_expiry=50)
    with pytest.raises(UpstreamError) as info:
        await pool.request(b"GET", b"/", [], b"")
    assert info.value.kind == "connect"


async def test_garbage_instead_of_http_is_a_protocol_error() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        port = listeners[0].socket.getsockname()[1]
        pool = ConnectionPool(f"http://127.0.0.1:{port}", connect_timeout=5, keepalive_expiry=50)
        with pytest.raises(UpstreamError) as info:
            await pool.request(b"GET", b"/", [], b"")
        assert info.value.kind in ("protocol", "reset")
        nursery.cancel_scope.cancel()


async def test_base_path_of_the_url_prefixes_every_request() -> None:
    async with running_mock() as (mock, url):
        pool = ConnectionPool(url + "/v1/", connect_timeout=5, keepalive_expiry=50)
        resp = await pool.request(b"GET", b"/models?limit=2", [], b"")
        await _collect(resp)
        assert mock.requests[-1].path == "/v1/models" and mock.requests[-1].query == "limit=2"
        assert mock.requests[-1].header(b"host") == url.split("//")[1].encode()


async def test_tls_upstream_with_keep_alive() -> None:
    """The path real Anthropic takes: TLS, SNI, certificate checked, connection reused."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    accepted: list[int] = []

    async def handler(stream: trio.SSLStream) -> None:
        accepted.append(1)
        buf = b""
        try:
            while True:
                got = await read_head(stream, buf)
                if got is None:
                    return
                head, buf = got
                assert b"host: localhost:" in head.lower()
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
        except trio.BrokenResourceError:
            return

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_ssl_over_tcp_listeners(0, server_ctx, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        pool = ConnectionPool(f"https://localhost:{port}", connect_timeout=5, keepalive_expiry=50, ssl_context=client_ctx)
        for _ in range(3):
            resp = await pool.request(b"GET", b"/", [], b"")
            assert await _collect(resp) == b"secure"
            pool.release(resp)
        assert pool.opened == 1 and len(accepted) == 1
        # An untrusted certificate is a connect error, never a silent downgrade.
        strict = ConnectionPool(f"https://localhost:{port}", connect_timeout=5, keepalive_expiry=50)
        with pytest.raises(UpstreamError) as info:
            await strict.request(b"GET", b"/", [], b"")
        assert info.value.kind == "connect"
        nursery.cancel_scope.cancel()


async def _keep_alive_server(closed: list[int], task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answers bodiless requests on kept-alive connections; counts the connections the client closed."""

    async def handler(stream: trio.SocketStream) -> None:
        rest = b""
        while (got := await read_head(stream, rest)) is not None:
            rest = got[1]
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        closed.append(1)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_idle_connections_are_closed_after_their_keep_alive_time(autojump_clock: trio.testing.MockClock) -> None:
    """After a burst, the cold end of the idle stack is closed on time, with
    traffic (the warm connection stays in use) and without it."""
    closed: list[int] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_keep_alive_server, closed)
        pool = ConnectionPool(f"http://127.0.0.1:{port}", connect_timeout=5, keepalive_expiry=50)
        nursery.start_soon(pool.reap_idle)

        async def one() -> None:
            resp = await pool.request(b"GET", b"/", [], b"")
            assert await _collect(resp) == b"ok"
            pool.release(resp)

        burst = [await pool.request(b"GET", b"/", [], b"") for _ in range(20)]
        for resp in burst:
            await _collect(resp)
            pool.release(resp)
        assert pool.idle == 20
        for _ in range(6):  # one request every 10 s keeps the warmest connection in use
            await trio.sleep(10)
            await one()
        assert (pool.idle, pool.opened) == (1, 20)
        await trio.sleep(1)
        assert len(closed) == 19  # the upstream saw the cold ones closed
        await trio.sleep(50)  # no traffic at all: the last one goes too
        assert pool.idle == 0 and len(closed) == 20
        await pool.aclose()
        nursery.cancel_scope.cancel()
