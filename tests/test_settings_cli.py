"""Settings validation, the CLI's refusals, and draining a real `weir serve` process."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from proxy.cli import main
from proxy.settings import SettingsError, check_exposure, load_settings, settings_from_dict
from proxy.sse import SSEParser

ROOT = Path(__file__).resolve().parents[1]


def test_toml_and_env_build_one_settings_object(tmp_path: Path) -> None:
    cfg = tmp_path / "weir.toml"
    cfg.write_text('[server]\nport = 9001\n[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:1"\napi_key_envs = ["MY_KEY"]\n')
    s = load_settings(str(cfg), environ={"WEIR_SERVER__WORKERS": "3", "WEIR_DEADLINES__TOTAL_S": "12.5"})
    assert (s.server.port, s.server.workers, s.deadlines.total_s) == (9001, 3, 12.5)
    assert s.upstreams[0].keys({"MY_KEY": "secret"}) == ["secret"]


@pytest.mark.parametrize(
    ("text", "environ", "named"),
    [
        ("[server]\nprot = 1\n", {}, "prot"),
        ("[sever]\nport = 1\n", {}, "sever"),
        ("[server]\nport = 'eighty'\n", {}, "port"),
        ("", {"WEIR_SERVER__PROT": "1"}, "prot"),
        ("", {"WEIR_BOGUS__X": "1"}, "bogus"),
        ("[[routes]]\nmatch = '*'\ntargets = ['nowhere']\n", {}, "nowhere"),
        ("[server]\nport = 1\n[[upstreams]]\nname='a'\nurl='ftp://x'\n", {}, "url"),
    ],
)
def test_a_mistyped_key_stops_start_up_naming_it(tmp_path: Path, text: str, environ: dict, named: str) -> None:
    cfg = tmp_path / "weir.toml"
    cfg.write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings(str(cfg), environ=environ)
    assert named in str(info.value)


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "weir.toml"
    cfg.write_text("[server\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(str(cfg), environ={})


def test_refuses_to_expose_an_upstream_key_without_client_keys() -> None:
    s = settings_from_dict({"server": {"host": "0.0.0.0"}, "upstreams": [{"url": "https://api.anthropic.com", "api_keys": ["sk-x"]}]})
    with pytest.raises(SettingsError, match="client keys"):
        check_exposure(s, {})
    loopback = settings_from_dict({"upstreams": [{"url": "https://api.anthropic.com", "api_keys": ["sk-x"]}]})
    check_exposure(loopback, {})
    guarded = settings_from_dict(
        {"server": {"host": "0.0.0.0"}, "upstreams": [{"url": "https://api.anthropic.com", "api_keys": ["sk-x"]}], "auth": {"client_keys": [{"tenant": "t", "key": "k"}]}}
    )
    check_exposure(guarded, {})


def test_cli_exits_with_a_message_on_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    os.environ["WEIR_TEST_SECRET_KEY"] = "sk-should-never-print"
    try:
        code = main(["serve", "--host", "0.0.0.0", "--upstream", "https://api.anthropic.com", "--upstream-key-env", "WEIR_TEST_SECRET_KEY"])
    finally:
        del os.environ["WEIR_TEST_SECRET_KEY"]
    err = capsys.readouterr().err
    assert code == 2 and "refusing to listen" in err
    assert "sk-should-never-print" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"weir {importlib.metadata.version('weir')}\n"


@pytest.mark.parametrize("command", ["serve", "mock-upstream"])
def test_a_busy_port_is_one_line_and_a_failure(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main([command, "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"weir{' mock-upstream' if command != 'serve' else ''}: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, limit: float = 60.0) -> None:  # a loaded 2-core machine starts Python slowly
    end = time.monotonic() + limit
    while time.monotonic() < end:
        assert proc.poll() is None, "weir serve exited during start-up"
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("weir serve did not become ready")


def test_sigterm_drains_in_flight_streams_then_exits(tmp_path: Path) -> None:
    """One process, real signals: the whole quick-start path (built-in mock) too.

    Real time is unavoidable here (a separate process and a signal), so the
    timings are small and generous.
    """
    port = _free_port()
    cfg = tmp_path / "weir.toml"
    # Otherwise the embedded defaults, as README's first command runs them:
    # the built-in mock, and the L2 cache in a SQLite file in the default data
    # directory ($XDG_STATE_HOME/weir, which does not exist yet).
    cfg.write_text("[server]\ndrain_s = 20\ndrain_notice_s = 0.6\naccess_log = false\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--config", str(cfg)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        det = b'{"model":"m","max_tokens":8,"temperature":0,"messages":[{"role":"user","content":"cache me"}]}'
        first = httpx.post(url + "/v1/messages", content=det, headers={"x-api-key": "k"}, timeout=10)
        second = httpx.post(url + "/v1/messages", content=det, headers={"x-api-key": "k"}, timeout=10)
        assert (first.headers["x-weir-cache"], second.headers["x-weir-cache"]) == ("miss", "hit")
        headers = {"x-api-key": "k", "x-mock-fault": "slow=60"}  # ~16 events, ~1 s
        req = b'{"model":"m","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/messages", content=req, headers=headers) as stream:
                chunks = stream.iter_raw()
                got = [next(chunks)]  # the stream has begun
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                with httpx.Client(base_url=url, timeout=5) as other:
                    ready = other.get("/ready")
                    assert ready.status_code == 503 and ready.json()["status"] == "draining"
                    refused = other.post("/v1/messages", content=req.replace(b'"stream":true', b'"stream":false'), headers={"x-api-key": "k"})
                    assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded_error"
                got.extend(chunks)
        events = [e.event for e in SSEParser().feed(b"".join(got))]
        assert events[0] == "message_start" and events[-1] == "message_stop"  # finished, not cut
        time.sleep(0.6)  # past the notice period the listeners are closed
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    data_dir = tmp_path / "state" / "weir"
    assert (data_dir / "cache.db").exists()  # the deterministic reply reached L2…
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "weir.toml"]  # …and nothing else was written
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "built-in mock upstream" in err.splitlines()[0]  # says so in its first log line
    assert "draining" in err


def _post(url: str) -> httpx.Response:
    req = b'{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
    return httpx.post(url + "/v1/messages", content=req, headers={"x-api-key": "k"}, timeout=10)


def test_workers_share_one_port_and_drain_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_SERVER__ACCESS_LOG": "false", "WEIR_CACHE__L2": "none"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        workers: set[str] = set()
        deadline = time.monotonic() + 15
        # The kernel spreads new connections over the workers; each worker
        # process has its own random request-id prefix, which tells them apart.
        while len(workers) < 2 and time.monotonic() < deadline:
            r = _post(url)
            assert r.status_code == 200
            workers.add(r.headers["x-request-id"][: len("req_weir_") + 12])
        assert len(workers) == 2, "both workers answer on the one port"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_plain_hypercorn_command_serves_the_same_app(tmp_path: Path) -> None:
    port = _free_port()
    # The bind comes from Weir's settings, as README says (no --bind).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_CACHE__L2": "none", "WEIR_SERVER__PORT": str(port)}
    hypercorn = str(Path(sys.executable).parent / "hypercorn")
    proc = subprocess.Popen(
        [hypercorn, "-c", "python:proxy.hypercorn_conf.config", "proxy.asgi:app"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        r = _post(url)
        assert r.status_code == 200 and r.json()["type"] == "message"
        assert r.headers["x-request-id"].startswith("req_weir_")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_hypercorn_toml_agrees_with_weirs_defaults() -> None:
    """hypercorn.toml (plain Hypercorn with a fixed file) and hypercorn_settings
    (weir serve, and the python: config) must not drift apart."""
    import tomllib

    from proxy.cli import hypercorn_settings
    from proxy.settings import Settings

    fixed = tomllib.loads((ROOT / "hypercorn.toml").read_text())
    ours = hypercorn_settings(Settings())
    for name in ("worker_class", "bind", "workers", "graceful_timeout", "keep_alive_timeout", "keep_alive_max_requests", "backlog", "include_server_header"):
        assert fixed[name] == ours[name], name
    assert not fixed["accesslog"] and ours["accesslog"] is None


def test_the_hypercorn_toml_command_serves_the_same_app(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_CACHE__L2": "none"}
    hypercorn = str(Path(sys.executable).parent / "hypercorn")
    proc = subprocess.Popen(
        [hypercorn, "-c", str(ROOT / "hypercorn.toml"), "--bind", f"127.0.0.1:{port}", "proxy.asgi:app"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        r = _post(url)
        assert r.status_code == 200 and r.json()["type"] == "message"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
