"""A TCP forwarder a test owns, to make a service unreachable without touching it.

``cut()`` closes every forwarded connection and refuses new ones (the
listener stays bound but new connections are closed at once, as a dead
database would look to a client); ``restore()`` forwards again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self._up = True
        self._conns: set[trio.CancelScope] = set()
        self.accepted = 0

    def cut(self) -> None:
        self._up = False
        for scope in list(self._conns):
            scope.cancel()

    def restore(self) -> None:
        self._up = True

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client:
            if not self._up:
                return
            try:
                upstream = await trio.open_tcp_stream(self.host, self.port)
            except OSError:
                return
            async with upstream:
                with trio.CancelScope() as scope:
                    self._conns.add(scope)
                    try:
                        async with trio.open_nursery() as n:
                            n.start_soon(_pump, client, upstream, n.cancel_scope)
                            n.start_soon(_pump, upstream, client, n.cancel_scope)
                    finally:
                        self._conns.discard(scope)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.listen_port = listeners[0].socket.getsockname()[1]
        task_status.started(self.listen_port)
        await trio.serve_listeners(self._handle, listeners)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while True:
            data = await src.receive_some(65536)
            if not data:
                break
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


@asynccontextmanager
async def running_tcp_proxy(host: str, port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(host, port)
    async with trio.open_nursery() as n:
        await n.start(proxy.serve)
        yield proxy
        n.cancel_scope.cancel()
