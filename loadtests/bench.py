"""Side-by-side benchmark: server floor, mock upstream direct, and Weir, in one run.

Run: ``loadtests/bench [--duration 10] [--connections 32] [--quick] [--save] [--out loadtests/results]``
(or ``.venv/bin/python -m loadtests.bench ...``). The default run takes about
2.5 minutes, ``--quick`` about 40 s. Results go to
``<out>/runs/bench-<timestamp>.json|md`` (ignored by git); ``--save`` also
overwrites the committed ``<out>/latest.json|md`` (``loadtests/record.py``).
The exit status is 1 when any request failed (non-2xx, socket error), a probe
showed Weir altering a reply, or the slow stream lagged.

What it starts, each on a free loopback port:

* the mock upstream (``mock``, unpaced, ``--output-tokens 100``);
* the floor (``loadtests/floor.py`` under Hypercorn with Weir's Hypercorn settings):
  the cheapest reply Hypercorn's trio worker can give;
* Weir (``python -m proxy.cli serve --workers 1 --upstream <mock>``), with its
  JSON access log ON (the default a user runs), and again with it OFF.

Every load run posts the same Claude-Code-sized body (``loadtests/payload.py``,
~45 KB, long ``anthropic-beta``, ``x-api-key``) with ``wrk --latency``
through a Lua script written to a temp dir. Scenarios, back to back:

* saturation at ``--connections``: floor, direct → mock and through Weir,
  non-streamed and streamed (~150 SSE events a stream: thinking + 100 text
  deltas, unpaced, so each stream arrives in one upstream write);
* moderate load for the added-latency figure: ``--moderate-connections``
  connections, each pausing between requests (wrk's ``delay()`` hook: wrk2's
  constant rate is not available) so the offered rate is ~30% of Weir's
  saturated throughput; added latency = through-Weir p50/p99 minus direct;
* one slow stream (20 tokens/s, via ``x-mock-tokens-per-second``) read at the
  same time direct and through Weir by an httpx client in this trio process:
  the extra delay of each event through Weir.

Pinning, for stable figures on the 2-core machine this was written for: the
server under test (floor, Weir, or the mock in the saturating direct runs)
runs alone on core 0; wrk, this process and the mock (while it is Weir's
upstream) share core 1. Each row reports both cores' busy time from
``/proc/stat``, so CPU stolen by anything else on the machine shows up as
"other" instead of silently skewing the figures.

Figures per row: req/s, p50, p99 (parsed from wrk's text), and for the server
under test CPU-seconds per 1,000 requests (``/proc/<pid>/stat`` utime+stime
of its whole process tree over the run), peak RSS (``VmHWM``) and, streamed,
SSE events relayed per CPU-second.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from proxy.sse import SSEParser

from .payload import claude_code_body, claude_code_headers
from .procs import free_port
from .record import RESULTS, add_save_flag, record

__all__ = [
    "BenchConfig",
    "WrkResult",
    "ProcSample",
    "parse_wrk",
    "parse_duration_ms",
    "lua_script",
    "read_proc_stat_cpu",
    "read_vm_hwm_kib",
    "parse_cpu_lines",
    "relay_delays",
    "render_markdown",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchConfig(msgspec.Struct, frozen=True):
    duration_s: float = 10.0  # per measured run; 10 s holds ~10,000 requests at the floor's rate
    warmup_s: float = 1.0  # unmeasured wrk run first: connections open, allocator and caches warm
    connections: int = 32  # half Weir's default upstream budget (64): saturates it without queueing in httpx
    moderate_connections: int = 8  # the brief's "few connections" for the latency run
    moderate_fraction: float = 0.3  # of Weir's saturated req/s: load where queueing barely adds latency
    output_tokens: int = 100  # ~100 text deltas a stream, as the brief specifies
    slow_tokens: int = 60  # slow stream: ~90 paced deltas (thinking + text), ~4.5 s at 20 tokens/s
    slow_tps: float = 20.0  # a slow model's pace; 50 ms between events makes each delay visible
    slow_limit_ms: float = 10.0  # "within a few ms": a median above fails the run, a max above warns
    body_bytes: int = 45_000  # mid-range of Claude Code's 30-60 KB turns (payload.py)
    mock_workers: int = 1  # one core for the mock anyway; its CPU share is reported to prove headroom
    nolog: bool = True  # also run Weir with its access log off
    pin: bool = True  # core 0: server under test; core 1: load side


QUICK = dict(duration_s=3.0, warmup_s=1.0, slow_tokens=30, nolog=False)


# ---------------------------------------------------------------------------
# Pure parts: wrk's output, /proc, the Lua script, the report
# ---------------------------------------------------------------------------


class WrkResult(msgspec.Struct):
    requests: int
    elapsed_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int = 0
    socket_errors: dict[str, int] = {}

    @property
    def failures(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s|m|h)$")


def parse_duration_ms(text: str) -> float:
    """wrk prints times as ``512.00us``, ``1.23ms``, ``1.20s`` or ``2.00m``."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """Read the figures out of ``wrk --latency`` text output; raise if any is missing."""
    pct: dict[str, float] = {}
    for m in re.finditer(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", text, re.M):
        pct[m.group(1)] = parse_duration_ms(m.group(2))
    total = re.search(r"^\s*(\d+) requests in (\S+?),", text, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if total is None or rate is None or set(pct) != {"50", "99"}:
        raise ValueError("wrk output lacks requests, rate or latency percentiles (was --latency given?):\n" + text)
    errors: dict[str, int] = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock is not None:
        errors = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), sock.groups()) if int(v)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(total.group(1)),
        elapsed_s=parse_duration_ms(total.group(2)) / 1000.0,
        rps=float(rate.group(1)),
        p50_ms=pct["50"],
        p99_ms=pct["99"],
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=errors,
    )


def _lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def lua_script(body_path: str, path: str, headers: dict[str, str], delay_ms: int = 0) -> str:
    """A wrk script posting the file's bytes; the body is read once, at start.

    A static ``wrk.body`` lets wrk format the request once per thread instead
    of per request, so the load generator stays cheap next to the servers.
    ``delay_ms`` pauses each connection between requests (the moderate run).
    """
    lines = ['wrk.method = "POST"', f"wrk.path = {_lua_str(path)}"]
    lines += [f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items()]
    lines += [
        f"local f = assert(io.open({_lua_str(body_path)}, \"rb\"))",
        "wrk.body = f:read(\"*a\")",
        "f:close()",
    ]
    if delay_ms > 0:
        lines += ["function delay()", f"  return {int(delay_ms)}", "end"]
    return "\n".join(lines) + "\n"


def read_proc_stat_cpu(stat_text: str) -> float:
    """utime + stime, in seconds, from the text of ``/proc/<pid>/stat``.

    The command name (field 2) may hold spaces and parentheses, so fields are
    counted from the last ``)``: utime and stime are fields 14 and 15.
    """
    rest = stat_text[stat_text.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def _ppid(stat_text: str) -> int:
    return int(stat_text[stat_text.rindex(")") + 2 :].split()[1])


def read_vm_hwm_kib(status_text: str) -> int:
    m = re.search(r"^VmHWM:\s+(\d+) kB", status_text, re.M)
    return int(m.group(1)) if m else 0


def parse_cpu_lines(proc_stat: str) -> dict[str, tuple[float, float]]:
    """Per-core (busy, total) seconds from ``/proc/stat``; iowait counts as idle."""
    out: dict[str, tuple[float, float]] = {}
    for line in proc_stat.splitlines():
        if re.match(r"cpu\d+ ", line):
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]
            total = sum(v)
            out[name] = ((total - v[3] - v[4]) / CLK_TCK, total / CLK_TCK)
    return out


def relay_delays(direct: list[float], weir: list[float]) -> dict[str, float]:
    """Per-event extra arrival time through Weir, in ms (timestamps in seconds).

    Both streams were requested at the same instant from the same upstream
    pacing, so event i's arrival difference is what Weir added to it; the
    first event's difference includes Weir's per-request overhead.
    """
    if not direct or len(direct) != len(weir):
        raise ValueError(f"streams differ in length: {len(direct)} direct, {len(weir)} through Weir")
    extra = [(w - d) * 1000.0 for d, w in zip(direct, weir)]
    return {
        "events": len(extra),
        "first_ms": extra[0],
        "median_ms": statistics.median(extra),
        "max_ms": max(extra),
        "max_after_first_ms": max(extra[1:], default=extra[0]),
    }


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# Weir benchmark — {meta['timestamp']}",
        "",
        f"{meta['pinning']}. Body {meta['body_bytes']:,} B (Claude-Code-shaped), "
        f"{meta['events_per_stream']} SSE events a stream, wrk {meta['duration_s']:g} s a run. "
        f"Weir access log ON unless the scenario says otherwise. \"other\" = core time used by processes outside the bench; "
        f"\"load side\" = wrk + bench client + mock-as-upstream on the load core.",
        "",
        "| scenario | conns | req/s | p50 ms | p99 ms | fails | server CPU-s /1k req | server core % | events /CPU-s | peak RSS MiB | core0 other % | load side % | core1 other % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["scenarios"]:
        lines.append(
            "| {name} | {conns} | {rps} | {p50} | {p99} | {fails} | {cpu} | {core} | {ev} | {rss} | {other} | {load} | {other1} |".format(
                name=r["name"],
                conns=r["connections"],
                rps=_f(r["rps"], "{:,.0f}"),
                p50=_f(r["p50_ms"], "{:.2f}"),
                p99=_f(r["p99_ms"], "{:.2f}"),
                fails=("**%d**" % r["failures"]) if r["failures"] else "0",
                cpu=_f(r.get("cpu_s_per_1k"), "{:.3f}"),
                core=_f(r.get("server_core_pct"), "{:.0f}"),
                ev=_f(r.get("events_per_cpu_s"), "{:,.0f}"),
                rss=_f(r.get("peak_rss_mib"), "{:.0f}"),
                other=_f(r.get("core0_other_pct"), "{:.0f}"),
                load=_f(r.get("load_core_pct"), "{:.0f}"),
                other1=_f(r.get("core1_other_pct"), "{:.0f}"),
            )
        )
    s = report["summary"]
    lines += ["", "## Summary", ""]
    for key, label in (
        ("weir_vs_floor", "Weir non-streamed throughput / floor"),
        ("weir_nolog_vs_floor", "Weir (access log off) non-streamed throughput / floor"),
        ("weir_cpu_vs_floor", "Weir CPU per non-streamed request / floor's (robust to a busy machine)"),
        ("direct_vs_weir_ns", "direct-to-mock / through-Weir throughput, non-streamed (mock headroom)"),
        ("direct_vs_weir_s", "direct-to-mock / through-Weir throughput, streamed (mock headroom)"),
    ):
        if s.get(key) is not None:
            lines.append(f"- {label}: **{s[key]:.2f}×**")
    for key, label in (("added_ns", "non-streamed"), ("added_s", "streamed, whole stream")):
        a = s.get(key)
        if a:
            lines.append(
                f"- Added latency at moderate load ({label}, ~{a['rps']:.0f} req/s): "
                f"p50 **{a['p50_ms']:+.2f} ms**, p99 **{a['p99_ms']:+.2f} ms**"
            )
    if s.get("mock_cpu_pct_during_weir") is not None:
        lines.append(f"- Mock upstream CPU while serving Weir at saturation: {s['mock_cpu_pct_during_weir']:.0f}% of a core")
    slow = s.get("slow_stream")
    if slow:
        lines.append(
            f"- Slow stream ({slow['events']} events at {slow['tps']:g} tokens/s): extra delay per event through Weir "
            f"median **{slow['median_ms']:.2f} ms**, max {slow['max_ms']:.2f} ms (first event {slow['first_ms']:.2f} ms)"
        )
    if s.get("access_log_lines") is not None:
        lines.append(f"- Weir access-log lines written (log ON instance): {s['access_log_lines']:,}")
    lines += ["", "## Failures", ""]
    lines += [f"- **{f}**" for f in report["failures"]] or ["- none"]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The trio shell: processes, sampling, wrk
# ---------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class ProcSample(msgspec.Struct):
    cpu_s: float  # the tree's utime + stime
    hwm_kib: int  # the largest VmHWM in the tree
    cores: dict[str, tuple[float, float]]
    children_cpu_s: float  # this process's reaped children (wrk)
    self_cpu_s: float  # this process: the slow-stream client, sampling
    pids: list[int]


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (Hypercorn and the mock run their work in children)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = _ppid(_read(f"/proc/{entry}/stat"))
            except (OSError, ValueError):
                continue  # exited meanwhile
    out, frontier = [root], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _sample_sync(root: int | None, extra: int | None = None) -> ProcSample:
    pids = _tree(root) if root else []
    if extra:
        pids += _tree(extra)
    cpu, hwm = 0.0, 0
    for pid in pids:
        try:
            cpu += read_proc_stat_cpu(_read(f"/proc/{pid}/stat"))
            hwm = max(hwm, read_vm_hwm_kib(_read(f"/proc/{pid}/status")))
        except OSError:
            continue
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return ProcSample(cpu, hwm, parse_cpu_lines(_read("/proc/stat")), ru.ru_utime + ru.ru_stime, me.ru_utime + me.ru_stime, pids)


async def sample(root: int | None, extra: int | None = None) -> ProcSample:
    return await trio.to_thread.run_sync(_sample_sync, root, extra)


class Server:
    """A child process that lives in the bench's nursery; cancelling the nursery stops it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, ready_url: str) -> None:
        self.name, self.argv, self.env, self.log_path, self.ready_url = name, argv, env, log_path, ready_url
        self.process: trio.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, nursery: trio.Nursery) -> None:
        log = await trio.to_thread.run_sync(open, self.log_path, "ab")
        self.process = await nursery.start(
            lambda task_status: trio.run_process(
                self.argv, stdout=log, stderr=log, env=self.env, cwd=str(ROOT), check=False, task_status=task_status
            )
        )
        log.close()  # the child holds its own copy of the descriptor
        # A client of its own, closed once the server answers: an idle
        # keep-alive connection left open would hold up the server's graceful stop.
        async with httpx.AsyncClient(timeout=5) as client:
            with trio.move_on_after(20):  # Weir's cold start imports Quart and httpx: ~1-2 s
                await self._wait_ready(client)
                return
        raise RuntimeError(f"{self.name} not ready after 20 s; see {self.log_path}")

    async def _wait_ready(self, client: httpx.AsyncClient) -> None:
        assert self.process is not None
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                resp = await client.get(self.ready_url)
                if resp.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


def _pin(pids: list[int], core: int | None) -> None:
    if core is None:
        return
    for pid in pids:
        try:
            os.sched_setaffinity(pid, {core})
        except OSError:
            continue


async def run_wrk(url: str, script: Path, connections: int, duration_s: float) -> WrkResult:
    argv = [
        # wrk takes whole seconds only.
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency",
        # Long enough that a slow reply counts in p99 instead of vanishing as a timeout.
        "--timeout", "30s",
        "-s", str(script), url,
    ]  # fmt: skip
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    text = done.stdout.decode()
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.decode()}{text}")
    return parse_wrk(text)


class Bench:
    def __init__(self, cfg: BenchConfig, tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.rows: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.warnings: list[str] = []
        self.events_per_stream = 0
        self.server_core: int | None = 0 if cfg.pin else None
        self.load_core: int | None = 1 if cfg.pin else None
        self.headers = claude_code_headers()
        self.bodies = {False: claude_code_body(False, cfg.body_bytes), True: claude_code_body(True, cfg.body_bytes)}
        for stream, body in self.bodies.items():
            (tmp / f"body-{int(stream)}.json").write_bytes(body)

    async def script(self, stream: bool, delay_ms: int = 0) -> Path:
        path = self.tmp / f"post-{int(stream)}-{delay_ms}.lua"
        body = str(self.tmp / f"body-{int(stream)}.json")
        await trio.Path(path).write_text(lua_script(body, "/v1/messages?beta=true", self.headers, delay_ms))
        return path

    async def measure(
        self,
        name: str,
        url: str,
        stream: bool,
        connections: int,
        server: Server | None,
        *,
        delay_ms: int = 0,
        mock: Server | None = None,
    ) -> dict[str, Any]:
        """One scenario: warm up, then a measured wrk run with /proc samples around it."""
        script = await self.script(stream, delay_ms)
        cfg = self.cfg
        if cfg.warmup_s > 0:
            await run_wrk(url, script, connections, cfg.warmup_s)
        root = server.pid if server else None
        mock_pid = mock.pid if mock else None
        before, mock_before = await sample(root), await sample(mock_pid)
        res = await run_wrk(url, script, connections, cfg.duration_s)
        after, mock_after = await sample(root), await sample(mock_pid)
        t = res.elapsed_s
        row: dict[str, Any] = {
            "name": name,
            "connections": connections,
            "stream": stream,
            "delay_ms": delay_ms,
            "requests": res.requests,
            "elapsed_s": t,
            "rps": res.rps,
            "p50_ms": res.p50_ms,
            "p99_ms": res.p99_ms,
            "non2xx": res.non2xx,
            "socket_errors": res.socket_errors,
            "failures": res.failures,
        }
        wrk_cpu = after.children_cpu_s - before.children_cpu_s
        mock_cpu = (mock_after.cpu_s - mock_before.cpu_s) if mock else 0.0
        if server is not None:
            cpu = after.cpu_s - before.cpu_s
            row["server_cpu_s"] = cpu
            row["server_core_pct"] = 100.0 * cpu / t
            row["cpu_s_per_1k"] = 1000.0 * cpu / res.requests if res.requests else None
            row["peak_rss_mib"] = after.hwm_kib / 1024.0
            if stream and cpu > 0:
                row["events_per_cpu_s"] = self.events_per_stream * res.requests / cpu
        if mock is not None:
            row["mock_core_pct"] = 100.0 * mock_cpu / t
        row["wrk_core_pct"] = 100.0 * wrk_cpu / t
        for core, key in ((self.server_core, "core0"), (self.load_core, "core1")):
            if core is None:
                continue
            busy = after.cores[f"cpu{core}"][0] - before.cores[f"cpu{core}"][0]
            row[f"{key}_busy_pct"] = 100.0 * busy / t
        if self.server_core is not None and server is not None:
            row["core0_other_pct"] = max(0.0, row["core0_busy_pct"] - row["server_core_pct"])
        if self.load_core is not None:
            # Ours on the load core: wrk, this process, and the mock when it is Weir's upstream.
            ours = wrk_cpu + (after.self_cpu_s - before.self_cpu_s) + (mock_cpu if server is not mock else 0.0)
            row["load_core_pct"] = 100.0 * ours / t
            row["core1_other_pct"] = max(0.0, row["core1_busy_pct"] - row["load_core_pct"])
        if res.failures:
            self.failures.append(f"{name}: {res.non2xx} non-2xx responses, socket errors {res.socket_errors or 'none'} of {res.requests} requests")
        if row.get("core0_other_pct", 0) > 15:
            self.warnings.append(f"{name}: {row['core0_other_pct']:.0f}% of the server core went to other processes; figures are low")
        if row.get("load_core_pct", 0) > 90:
            self.warnings.append(f"{name}: wrk and the mock used {row['load_core_pct']:.0f}% of the load core; the load side may have been the limit")
        if row.get("core1_other_pct", 0) > 15:
            self.warnings.append(f"{name}: {row['core1_other_pct']:.0f}% of the load core went to other processes")
        self.rows.append(row)
        print(
            f"  {name:<28} {res.rps:>9,.0f} req/s  p50 {res.p50_ms:8.2f} ms  p99 {res.p99_ms:8.2f} ms"
            + (f"  cpu/1k {row['cpu_s_per_1k']:.3f} s" if row.get("cpu_s_per_1k") else "")
            + (f"  FAILURES {res.failures}" if res.failures else ""),
            flush=True,
        )
        return row

    async def probe(self, mock_url: str, weir_url: str) -> None:
        """Weir must hand back the upstream's bytes unchanged; also counts events per stream."""
        headers = self.headers
        for stream in (False, True):
            got = []
            for base in (mock_url, weir_url):
                async with httpx.AsyncClient(timeout=30) as client:
                    resp = await client.post(base + "/v1/messages?beta=true", content=self.bodies[stream], headers=headers)
                got.append((resp.status_code, resp.content))
            if got[0] != got[1] or got[0][0] != 200:
                self.failures.append(
                    f"probe ({'streamed' if stream else 'non-streamed'}): direct {got[0][0]} ({len(got[0][1])} B) "
                    f"vs Weir {got[1][0]} ({len(got[1][1])} B): Weir altered the reply"
                )
            if stream:
                self.events_per_stream = len(SSEParser().feed(got[1][1]))

    async def slow_stream(self, mock_url: str, weir_url: str) -> dict[str, Any]:
        cfg = self.cfg
        headers = dict(self.headers)
        headers["x-mock-tokens-per-second"] = f"{cfg.slow_tps:g}"
        headers["x-mock-output-tokens"] = str(cfg.slow_tokens)
        times: dict[str, list[float]] = {}
        payloads: dict[str, list[bytes]] = {}

        async def read(name: str, base: str, client: httpx.AsyncClient) -> None:
            parser = SSEParser()
            t, p = times.setdefault(name, []), payloads.setdefault(name, [])
            async with client.stream("POST", base + "/v1/messages?beta=true", content=self.bodies[True], headers=headers) as resp:
                async for chunk in resp.aiter_raw():
                    now = time.perf_counter()
                    for ev in parser.feed(chunk):
                        t.append(now)
                        p.append(ev.data)

        # One client each: no shared pool, so neither request waits on the other.
        async with httpx.AsyncClient(timeout=60) as c1, httpx.AsyncClient(timeout=60) as c2:
            # Both connections open before the clock starts, so neither pays a handshake.
            await c1.get(mock_url + "/_mock/stats")
            await c2.get(weir_url + "/health")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, "direct", mock_url, c1)
                nursery.start_soon(read, "weir", weir_url, c2)
        if payloads["direct"] != payloads["weir"]:
            self.failures.append("slow stream: Weir's events differ from the upstream's")
        stats = relay_delays(times["direct"], times["weir"])
        stats["tps"] = cfg.slow_tps
        # The median is Weir's doing; a lone late event can be a neighbour's
        # process taking the core, so it warns instead of failing the run.
        if stats["median_ms"] > cfg.slow_limit_ms:
            self.failures.append(f"slow stream: events arrived {stats['median_ms']:.1f} ms later through Weir (median; limit {cfg.slow_limit_ms:g} ms)")
        elif stats["max_ms"] > cfg.slow_limit_ms:
            self.warnings.append(f"slow stream: one event arrived {stats['max_ms']:.1f} ms later through Weir (limit {cfg.slow_limit_ms:g} ms)")
        print(f"  slow stream: {stats['events']} events, extra per event median {stats['median_ms']:.2f} ms, max {stats['max_ms']:.2f} ms", flush=True)
        return stats


def _weir_env(access_log: bool) -> dict[str, str]:
    # A stray WEIR_* variable in the caller's shell must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")}
    env["WEIR_SERVER__ACCESS_LOG"] = "true" if access_log else "false"
    env["PYTHONPATH"] = str(ROOT)
    return env


async def run(bench: Bench) -> dict[str, Any]:
    cfg, tmp = bench.cfg, bench.tmp
    py = str(VENV_BIN / "python")
    on_server = ["taskset", "-c", str(bench.server_core)] if cfg.pin else []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    mock_port, floor_port = free_port(), free_port()
    mock_url, floor_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{floor_port}"
    mock = Server(
        "mock",
        [py, "-m", "mock", "--port", str(mock_port), "--workers", str(cfg.mock_workers), "--output-tokens", str(cfg.output_tokens)],
        env, tmp / "mock.log", mock_url + "/_mock/stats",
    )  # fmt: skip
    floor = Server(
        "floor",
        on_server + [str(VENV_BIN / "hypercorn"), "-c", "python:proxy.hypercorn_conf.config", "--bind", f"127.0.0.1:{floor_port}", "loadtests.floor:app"],
        env, tmp / "floor.log", floor_url + "/",
    )  # fmt: skip

    def weir(access_log: bool) -> Server:
        port = free_port()
        argv = on_server + [py, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "1", "--upstream", mock_url]
        return Server("weir" if access_log else "weir-nolog", argv, _weir_env(access_log), tmp / f"weir-{int(access_log)}.log", f"http://127.0.0.1:{port}/ready")

    def url(server: Server) -> str:
        return server.ready_url.rsplit("/", 1)[0] if server is not mock else mock_url

    summary: dict[str, Any] = {}
    C, M = cfg.connections, cfg.moderate_connections
    async with trio.open_nursery() as nursery:
        await mock.start(nursery)
        await floor.start(nursery)
        w = weir(True)
        await w.start(nursery)
        await bench.probe(mock_url, url(w))
        print(f"servers up; {bench.events_per_stream} SSE events a stream, body {len(bench.bodies[False]):,} B", flush=True)

        # Saturation, the server under test alone on the server core.
        _pin(await trio.to_thread.run_sync(_tree, mock.pid), bench.server_core)
        floor_row = await bench.measure("floor (raw ASGI)", floor_url, False, C, floor)
        d_ns = await bench.measure("direct → mock", mock_url, False, C, mock)
        d_s = await bench.measure("direct → mock, streamed", mock_url, True, C, mock)

        # Through Weir: the mock moves to the load core.
        _pin(await trio.to_thread.run_sync(_tree, mock.pid), bench.load_core)
        w_ns = await bench.measure("Weir", url(w), False, C, w, mock=mock)
        w_s = await bench.measure("Weir, streamed", url(w), True, C, w, mock=mock)
        if cfg.nolog:  # the full run only: shows whether throughput falls as connections grow
            await bench.measure(f"Weir, {M} connections", url(w), False, M, w, mock=mock)

        # Moderate load: same offered rate direct and through Weir.
        for stream, sat, key in ((False, w_ns, "added_ns"), (True, w_s, "added_s")):
            rate = max(1.0, cfg.moderate_fraction * sat["rps"])
            delay = max(1, round(1000.0 * M / rate))
            tag = ", streamed" if stream else ""
            d = await bench.measure(f"moderate direct{tag}", mock_url, stream, M, None, delay_ms=delay, mock=mock)
            x = await bench.measure(f"moderate Weir{tag}", url(w), stream, M, w, delay_ms=delay, mock=mock)
            summary[key] = {"rps": x["rps"], "p50_ms": x["p50_ms"] - d["p50_ms"], "p99_ms": x["p99_ms"] - d["p99_ms"], "delay_ms": delay}

        summary["slow_stream"] = await bench.slow_stream(mock_url, url(w))
        log_text = await trio.to_thread.run_sync(_read, str(w.log_path))
        summary["access_log_lines"] = log_text.count('"logger":"weir.access"')
        await w.stop()

        if cfg.nolog:
            wn = weir(False)
            await wn.start(nursery)
            n_ns = await bench.measure("Weir, access log off", url(wn), False, C, wn, mock=mock)
            await bench.measure("Weir, access log off, streamed", url(wn), True, C, wn, mock=mock)
            summary["weir_nolog_vs_floor"] = n_ns["rps"] / floor_row["rps"] if floor_row["rps"] else None
            await wn.stop()
        nursery.cancel_scope.cancel()

    summary["weir_vs_floor"] = w_ns["rps"] / floor_row["rps"] if floor_row["rps"] else None
    # CPU per request barely moves when a neighbour steals the core; req/s does.
    if w_ns.get("cpu_s_per_1k") and floor_row.get("cpu_s_per_1k"):
        summary["weir_cpu_vs_floor"] = w_ns["cpu_s_per_1k"] / floor_row["cpu_s_per_1k"]
    summary["direct_vs_weir_ns"] = d_ns["rps"] / w_ns["rps"] if w_ns["rps"] else None
    summary["direct_vs_weir_s"] = d_s["rps"] / w_s["rps"] if w_s["rps"] else None
    summary["mock_cpu_pct_during_weir"] = max(w_ns.get("mock_core_pct", 0), w_s.get("mock_core_pct", 0))
    for ratio in ("direct_vs_weir_ns", "direct_vs_weir_s"):
        if summary[ratio] is not None and summary[ratio] < 2:
            bench.warnings.append(f"{ratio}: the mock is less than 2× faster than Weir; it may be limiting Weir's figures")
    pinning = (
        f"Pinned with taskset/sched_setaffinity: server under test (floor, Weir; mock in the saturating direct runs) on core {bench.server_core}, "
        f"wrk + bench client + mock-as-upstream on core {bench.load_core}"
        if cfg.pin
        else "Not pinned"
    )
    return {
        "meta": {
            "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
            "pinning": pinning,
            "cores": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "python": sys.version.split()[0],
            "body_bytes": len(bench.bodies[False]),
            "events_per_stream": bench.events_per_stream,
            "duration_s": cfg.duration_s,
            "config": msgspec.to_builtins(cfg),
        },
        "scenarios": bench.rows,
        "summary": summary,
        "failures": bench.failures,
        "warnings": bench.warnings,
    }


def main(argv: list[str] | None = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="loadtests/bench", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, help=f"seconds per measured run (default {d.duration_s:g}; --quick {QUICK['duration_s']:g})")
    p.add_argument("--connections", type=int, default=d.connections, help="wrk connections at saturation")
    p.add_argument("--moderate-connections", type=int, default=d.moderate_connections)
    p.add_argument("--quick", action="store_true", help="short runs, no access-log-off runs: ~40 s")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--mock-workers", type=int, default=d.mock_workers)
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    add_save_flag(p, "latest")
    ns = p.parse_args(argv)
    fields: dict[str, Any] = dict(QUICK) if ns.quick else {}
    if ns.duration is not None:
        fields["duration_s"] = ns.duration
    pin = not ns.no_pin and (os.cpu_count() or 1) >= 2
    cfg = BenchConfig(connections=ns.connections, moderate_connections=ns.moderate_connections, mock_workers=ns.mock_workers, pin=pin, **fields)
    if cfg.pin:
        os.sched_setaffinity(0, {1})  # this process and wrk: the load core
    with tempfile.TemporaryDirectory(prefix="weir-bench-") as tmp:
        report = trio.run(run, Bench(cfg, Path(tmp)))  # Bench writes the bodies before trio starts
    text_json = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    text_md = render_markdown(report)
    written = record("bench", "latest", {"json": text_json, "md": text_md}, save=ns.save, out=Path(ns.out))
    print()
    print(text_md)
    print("written: " + ", ".join(str(p) for p in written))
    if report["failures"]:
        print("!!! BENCHMARK FAILURES:\n" + "\n".join("!!!   " + f for f in report["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
