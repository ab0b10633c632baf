"""The ``weir`` command: ``serve`` and ``mock-upstream``; the ledger's
``usage``, ``requests tail`` and ``dlq`` live in proxy/ledger/cli.py.

``weir serve`` runs the app under Hypercorn's trio worker in this process
(``--workers 1``) or in N worker processes sharing the port through
``SO_REUSEPORT``, each a whole Weir with its own lifespan nursery, restarted
by proxy/supervisor.py if it dies. It owns
the signals so that draining is Weir's: SIGTERM flips ``/ready`` to 503 and
refuses new requests, waits ``server.drain_notice_s`` for load balancers to
notice, then closes the listeners and lets in-flight streams finish for up
to ``server.drain_s``. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from functools import partial
from typing import Any

import msgspec
import trio

from .datadir import DataDirError, prepare_data_dir
from .settings import Settings, SettingsError, UpstreamSettings, check_exposure, load_settings
from .supervisor import SUPERVISOR_PID_ENV

log = logging.getLogger("weir")

__all__ = ["main", "hypercorn_config", "hypercorn_settings", "start_builtin_mock", "BuiltinMockApp"]


def hypercorn_settings(settings: Settings) -> dict[str, Any]:
    """Hypercorn's settings for LLM traffic, from Weir's: ``weir serve`` and
    ``hypercorn -c python:proxy.hypercorn_conf.config`` both use these."""
    s = settings.server
    return {
        "worker_class": "trio",
        "bind": [f"[{s.host.strip('[]')}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"],
        # Under plain Hypercorn; `weir serve` runs its own workers.
        "workers": s.workers,
        # Hypercorn's 3 s default would cut every stream in progress at a deploy.
        "graceful_timeout": s.drain_s,
        "keep_alive_timeout": s.keep_alive_s,
        # Hypercorn closes a connection after 1,000 requests by default; a
        # long-lived Claude Code connection would be dropped mid-session for no
        # gain. Effectively unlimited.
        "keep_alive_max_requests": 2**31,
        # Bursts of connections (a load balancer opening its pool) overflow the
        # default backlog of 100.
        "backlog": 2048,
        "accesslog": None,  # Weir writes its own JSON access log
        "errorlog": logging.getLogger("hypercorn.error"),
        "include_server_header": False,
        # Read by proxy/server.py's connection guard (not Hypercorn settings).
        "header_timeout_s": s.header_timeout_s,
        "body_idle_s": s.body_idle_s,
    }


def hypercorn_config(settings: Settings) -> Any:
    from hypercorn.config import Config

    return Config.from_mapping(hypercorn_settings(settings))


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    sock.setblocking(False)
    return sock


async def serve(settings: Settings, *, sock: socket.socket | None = None, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """One worker: the app under Hypercorn in this trio run, until a signal drains it."""
    from hypercorn.config import Sockets

    from .app import build_app
    from .server import worker_serve

    config = hypercorn_config(settings)
    sockets = None
    if sock is not None:
        sock.listen(config.backlog)
        sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])

    async with trio.open_nursery() as nursery:
        if settings.uses_mock():
            settings = await start_builtin_mock(settings, nursery)
        app = build_app(settings)
        drained = trio.Event()

        async def shutdown_trigger() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
                log.warning("signal received: draining", extra={"in_flight": app.in_flight, "drain_s": settings.server.drain_s})
                app.draining = True
                await trio.sleep(settings.server.drain_notice_s)
                drained.set()
                async for _ in signals:
                    log.warning("second signal: stopping now")
                    nursery.cancel_scope.cancel()

        async def run_server(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await worker_serve(app, config, sockets=sockets, shutdown_trigger=drained.wait, task_status=task_status)
            # Listeners closed and in-flight requests done (or cut at drain_s).
            nursery.cancel_scope.cancel()

        nursery.start_soon(shutdown_trigger)
        binds = await nursery.start(run_server)
        task_status.started((app, binds))


async def start_builtin_mock(settings: Settings, nursery: trio.Nursery) -> Settings:
    """The quick start: no upstream has a URL, so run the mock upstream in
    ``nursery`` and return settings that name it as an ordinary upstream.

    Weir itself never knows it talks to a mock. The first configured upstream
    (or one called ``mock``) keeps its other settings and gets the mock's URL;
    routes that name ``mock`` now name it.
    """
    from mock import MockUpstream

    mock = MockUpstream(settings.mock)
    port = await nursery.start(mock.serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    log.warning("no upstream configured: serving the built-in mock upstream at %s", url, extra={"mock_url": url})
    base = settings.upstreams[0] if settings.upstreams else UpstreamSettings(name="mock")
    routes = [
        msgspec.structs.replace(r, targets=[base.name + t[4:] if t.split(":", 1)[0] == "mock" else t for t in r.targets])
        for r in settings.routes
    ]
    return msgspec.structs.replace(settings, upstreams=[msgspec.structs.replace(base, url=url)], routes=routes)


class BuiltinMockApp:
    """``hypercorn proxy.asgi:app`` with no upstream: the lifespan starts the
    mock upstream first (``start_builtin_mock``), then builds Weir on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        from .app import build_app

        async with trio.open_nursery() as nursery:
            self.app = build_app(await start_builtin_mock(self.settings, nursery))
            await self.app(scope, receive, send)
            nursery.cancel_scope.cancel()


def _run_workers(settings: Settings) -> int:
    """N supervised worker processes on one port (proxy/supervisor.py). The
    parent keeps the port bound (not listening, so the kernel hands it no
    connections) to reserve it and to resolve port 0."""
    from .supervisor import supervise

    s = settings.server
    reserve = _reuse_port_socket(s.host, s.port)
    port = reserve.getsockname()[1]
    settings = msgspec.structs.replace(settings, server=msgspec.structs.replace(s, port=port, workers=1))
    print(f"weir: {s.workers} workers on http://{s.host}:{port}", file=sys.stderr, flush=True)
    hooks: dict[str, Any] = {}
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from .metrics import mark_worker_dead, worker_restarts

        # A dead worker's live gauges leave the sum (its counters stay); restarts
        # are counted in this process's file, summed into weir_worker_restarts_total.
        hooks = {"on_exit": mark_worker_dead, "on_restart": worker_restarts().inc}
    try:
        return trio.run(partial(supervise, msgspec.json.encode(settings), s.workers, port, s.data_path(f"supervisor-{port}.json"), **hooks))
    finally:
        reserve.close()


def _die_with_supervisor() -> None:
    """Drain and exit when the supervisor is gone, instead of lingering as an orphan.

    A supervisor killed with SIGKILL (or by the OOM killer) cannot stop its
    workers: they would keep serving the port for as long as their drain allows
    and block the next ``weir serve`` from binding it cleanly. Linux's
    PR_SET_PDEATHSIG has the kernel send SIGTERM — the ordinary drain — the
    moment the parent dies; the ppid check covers a parent that died before
    the request took effect. Elsewhere this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(os.environ.get(SUPERVISOR_PID_ENV, os.getppid())):
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(ready_fd: int) -> int:
    _die_with_supervisor()
    settings = msgspec.json.decode(sys.stdin.buffer.read(), type=Settings)
    from .logs import configure_logging

    configure_logging(settings.server.log_level)
    sock = _reuse_port_socket(settings.server.host, settings.server.port)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, settings, sock=sock))
            # Serving: tell the supervisor (a worker dying before this is not restarted).
            os.write(ready_fd, b"1")
            os.close(ready_fd)

    trio.run(main)
    return 0


def _serve_command(ns: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for flag, key in (
        ("host", "server.host"),
        ("port", "server.port"),
        ("workers", "server.workers"),
        ("data_dir", "server.data_dir"),
        ("ledger", "ledger.url"),
        ("upstream", "upstreams.url"),
        ("upstream_kind", "upstreams.kind"),
        ("upstream_model", "upstreams.model"),
        ("upstream_concurrency", "upstreams.max_connections"),
    ):
        value = getattr(ns, flag)
        if value is not None:
            overrides[key] = value
    if ns.upstream_key_env:
        overrides["upstreams.api_key_envs"] = [ns.upstream_key_env]
    try:
        settings = load_settings(ns.config, overrides=overrides)
        check_exposure(settings, os.environ)
        prepare_data_dir(settings.server.data_dir)
    except (SettingsError, DataDirError) as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return 2
    from .logs import configure_logging

    if not port_is_free(settings.server.host, settings.server.port, "weir"):
        return 1
    configure_logging(settings.server.log_level)
    if settings.uses_mock():
        log.warning("no upstream configured: Weir will answer from its built-in mock upstream (pass --upstream URL for a real one)")
    if settings.metrics.enabled:
        _prepare_metrics_dir(settings.server.data_path("metrics"))
    if settings.server.workers > 1:
        return _run_workers(settings)
    trio.run(serve, settings)
    return 0


def _prepare_metrics_dir(path: str) -> None:
    """prometheus-client's multiprocess directory, empty, named before any worker starts.

    The library picks its mode once, at import, from PROMETHEUS_MULTIPROC_DIR,
    so this runs before anything imports it; workers inherit the variable.
    Files left by an earlier run would add its counts to this one's.
    """
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def _mock_command(ns: argparse.Namespace) -> int:
    import mock

    try:
        upstream = mock.MockUpstream(mock.settings_from_args(ns))
    except ValueError as exc:
        print(f"weir mock-upstream: --fault: {exc}", file=sys.stderr)
        return 2
    if not port_is_free(ns.host, ns.port, "weir mock-upstream"):
        return 1
    try:
        trio.run(mock.serve_forever, upstream, ns.host, ns.port)
    except KeyboardInterrupt:
        pass
    return 0


def port_is_free(host: str, port: int, command: str) -> bool:
    """Bind and release the port before starting, so a busy one is one line
    and exit status 1 rather than an ExceptionGroup traceback from inside
    the server's nursery. SO_REUSEADDR as the servers set it (a port in
    TIME_WAIT is free); no SO_REUSEPORT, so a running Weir's port is busy."""
    if port == 0:
        return True
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host.strip("[]"), port))
    except OSError as exc:
        print(f"{command}: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return False
    return True


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weir")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description="A high-throughput proxy for LLM APIs.")
    parser.add_argument("--version", action="version", version=f"weir {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (default 8080)")
    p.add_argument("--config", help="TOML config file (default: $WEIR_CONFIG)")
    p.add_argument("--workers", type=int, help="worker processes (default 1)")
    p.add_argument("--data-dir", help="directory for every file Weir writes (default: $STATE_DIRECTORY, $XDG_STATE_HOME/weir or ~/.local/state/weir)")
    p.add_argument("--upstream", help="upstream base URL (Anthropic: without /v1; OpenAI: with /v1)")
    p.add_argument("--upstream-kind", choices=["anthropic", "openai"], help="upstream API (default anthropic)")
    p.add_argument("--upstream-model", help="model name to send upstream instead of the requested one")
    p.add_argument("--upstream-key-env", help="environment variable holding the upstream API key")
    p.add_argument("--upstream-concurrency", type=int, help="upstream connection budget (default 64)")
    p.add_argument("--ledger", help='the request ledger: a postgresql:// URL, "off", or "" for SQLite in the data directory (the default)')
    p.set_defaults(func=_serve_command)

    from .ledger.cli import add_commands

    add_commands(sub)

    import mock

    m = sub.add_parser("mock-upstream", help="run the mock Anthropic/OpenAI upstream")
    mock.add_arguments(m)
    m.set_defaults(func=_mock_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return _worker_main(int(argv[1]))
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
