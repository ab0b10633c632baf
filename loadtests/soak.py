"""Soak: the mutation fuzzer, the mock's fault matrix and slow clients against one
``weir serve --workers 2`` for N minutes; prints restarts, 5xx, hung requests,
RSS and fd growth.

    loadtests/soak --minutes 10

Everything runs as real processes on loopback: the mock upstream
(``python -m mock``), Weir under its supervisor, and this driver. Figures:

- fuzz cases run, and those whose answer broke the contract (5xx, malformed,
  hung: no answer and no close after every server deadline has passed);
- fault-matrix requests by outcome, on a target of their own (``fault-*``
  models) so the breaker they open is not the fuzzer's; a 500 "internal error"
  is Weir's own bug and counted as such (the upstream's errors pass through);
- slow clients (trickled heads and bodies, slow readers of streams) and
  whether each was cut by its deadline;
- worker restarts (the supervisor's file), and each worker's RSS and open fds
  sampled every 10 s: growth is last minus the sample after warm-up (1 minute).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import trio

from proxy.supervisor import read_state
from tests.rawsock import exchange, parse_replies
from tests.wirefuzz import cases, judge

from .procs import free_port, stop

ROOT = Path(__file__).resolve().parent.parent

FAULTS = [
    "", "status=429;retry_after=1", "status=500", "status=529", "status=400", "hang", "hang_after=3",
    "reset_after=3", "malformed", "error_event_after=3", "unknown_event", "fail_first=1;status=529", "slow=50",
]


def _proc_figures(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open fds) of one process, from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return 0, 0


class Figures:
    def __init__(self) -> None:
        self.fuzz_cases = 0
        self.fuzz_problems: list[str] = []
        self.fuzz_hung = 0
        self.faults: Counter[str] = Counter()
        self.weir_500 = 0
        self.slow: Counter[str] = Counter()
        self.samples: list[tuple[float, int, int]] = []  # (t, total RSS KiB, total fds)


async def fuzz(port: int, fig: Figures, stop: float, seed: int, concurrency: int) -> None:
    index = 0

    async def worker() -> None:
        nonlocal index
        while trio.current_time() < stop:
            case = cases(seed, 1, start=index)[0]
            index += 1
            # Read until a whole reply (then a kept-alive connection is ours to close),
            # or until every server deadline has passed (head 10 s, body 60 s, keep-alive 75 s).
            answer = await exchange(port, case.chunks, half_close=False, read_s=90, until_reply=True)
            fig.fuzz_cases += 1
            problem = judge(case, answer)
            if problem:
                if problem.startswith("no answer and no close"):
                    fig.fuzz_hung += 1
                fig.fuzz_problems.append(f"seed {seed} case {case.index}: {problem}")

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)


async def fault_matrix(url: str, fig: Figures, stop: float, concurrency: int) -> None:
    rng = random.Random(11)
    # "fault-…" routes to its own target, so the breaker this traffic opens is not the fuzzer's.
    body = b'{"model":"fault-model","max_tokens":32,"messages":[{"role":"user","content":"soak %d"}]%s}'

    async def worker(client: httpx.AsyncClient) -> None:
        while trio.current_time() < stop:
            fault = rng.choice(FAULTS) if rng.random() < 0.5 else ""
            stream = rng.random() < 0.5
            headers = {"x-api-key": "sk-soak", "anthropic-version": "2023-06-01", "x-weir-cache": "off"}
            if fault:
                headers["x-mock-fault"] = fault
            content = body % (rng.randrange(10**9), b',"stream":true' if stream else b"")
            try:
                async with client.stream("POST", "/v1/messages", content=content, headers=headers) as r:
                    data = await r.aread()
                outcome = str(r.status_code)
                if r.status_code == 500 and b"internal error" in data:
                    fig.weir_500 += 1  # Weir's own bug answer (an upstream's 500 passes as it came)
                if stream and r.status_code == 200 and b"event: error" in data:
                    outcome = "200+error_event"
            except httpx.TimeoutException:
                outcome = "client_timeout"
            except httpx.RemoteProtocolError:
                outcome = "cut"  # a plain body cut mid-way is dropped, by design: never a short body that looks whole
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            fig.faults[f"{fault or 'none'} → {outcome}"] += 1

    # Deadlines: the soak's Weir has total 20 s, so a hung upstream ends well inside 60 s.
    async with httpx.AsyncClient(base_url=url, timeout=60) as client, trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, client)


async def slow_clients(port: int, fig: Figures, stop: float, concurrency: int) -> None:
    rng = random.Random(13)
    kinds = ["trickled_head", "stalled_body", "slow_reader"]

    async def one(kind: str) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            raw = b""
            started = trio.current_time()
            with trio.move_on_after(120):
                if kind == "trickled_head":
                    async with trio.open_nursery() as n:

                        async def trickle() -> None:
                            try:
                                await stream.send_all(b"GET /health HTTP/1.1\r\n")
                                while True:
                                    await trio.sleep(1)
                                    await stream.send_all(b"x-slow: 1\r\n")
                            except trio.BrokenResourceError:
                                pass

                        n.start_soon(trickle)
                        while got := await stream.receive_some(65536):
                            raw += got
                        n.cancel_scope.cancel()
                elif kind == "stalled_body":
                    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ncontent-length: 500\r\n\r\n{")
                    while got := await stream.receive_some(65536):
                        raw += got
                else:  # reads a long stream one small piece a second
                    req = b'{"model":"m","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"slow %d"}]}' % rng.randrange(10**9)
                    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\nx-weir-cache: off\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(req), req))
                    while got := await stream.receive_some(512):
                        raw += got
                        await trio.sleep(0.2)
            took = trio.current_time() - started
        replies, _ = parse_replies(raw)
        status = replies[0].status if replies else 0
        fig.slow[f"{kind} → {status or 'closed'}{' (hung)' if took >= 120 else ''}"] += 1

    async def worker() -> None:
        while trio.current_time() < stop:
            await one(rng.choice(kinds))

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)


async def sample(state_path: str, fig: Figures, stop: float) -> None:
    start = trio.current_time()
    while trio.current_time() < stop:
        state = read_state(state_path)
        pids = state.workers if state else []
        rss = fds = 0
        for pid in pids:
            r, f = _proc_figures(pid)
            rss, fds = rss + r, fds + f
        fig.samples.append((trio.current_time() - start, rss, fds))
        await trio.sleep(10)


async def drive(args: argparse.Namespace, port: int, state_path: str) -> Figures:
    fig = Figures()
    stop = trio.current_time() + args.minutes * 60
    url = f"http://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample, state_path, fig, stop + 1)
        nursery.start_soon(fuzz, port, fig, stop, args.seed, args.fuzz_concurrency)
        nursery.start_soon(fault_matrix, url, fig, stop, args.fault_concurrency)
        nursery.start_soon(slow_clients, port, fig, stop, args.slow_concurrency)
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(prog="loadtests/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--fuzz-concurrency", type=int, default=8)
    parser.add_argument("--fault-concurrency", type=int, default=8)
    parser.add_argument("--slow-concurrency", type=int, default=50)
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="weir-soak-")
    mock_port, port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WEIR_SERVER__ACCESS_LOG": "false", "WEIR_DEADLINES__TOTAL_S": "20", "WEIR_DEADLINES__IDLE_S": "10"}
    log = open(os.path.join(data_dir, "weir.log"), "wb")
    config = os.path.join(data_dir, "weir.toml")
    with open(config, "w") as f:
        f.write(
            f'[[upstreams]]\nname = "clean"\nurl = "http://127.0.0.1:{mock_port}"\n'
            f'[[upstreams]]\nname = "faulty"\nurl = "http://127.0.0.1:{mock_port}"\n'
            '[[routes]]\nmatch = "fault*"\ntargets = ["faulty"]\n'
        )
    mock = subprocess.Popen([sys.executable, "-m", "mock", "--port", str(mock_port), "--tokens-per-second", "200"], env=env, stdout=log, stderr=log)
    weir = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "2", "--data-dir", data_dir, "--config", config],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    state_path = os.path.join(data_dir, f"supervisor-{port}.json")
    log.flush()
    try:
        deadline = time.monotonic() + 60
        while not ((s := read_state(state_path)) and len(s.workers) == 2):
            if time.monotonic() > deadline or weir.poll() is not None:
                print("weir did not start; see", log.name, file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"soak: {args.minutes:g} min, seed {args.seed}, weir on :{port} (log {log.name})", flush=True)
        fig = trio.run(drive, args, port, state_path)
        state = read_state(state_path)
    finally:
        stop([weir, mock])

    warm = [s for s in fig.samples if s[0] >= 60] or fig.samples
    first, last = warm[0], fig.samples[-1]
    print(f"fuzz cases run:        {fig.fuzz_cases}")
    print(f"  contract broken:     {len(fig.fuzz_problems)} (5xx: {sum('5xx' in p for p in fig.fuzz_problems)}, hung: {fig.fuzz_hung})")
    for p in fig.fuzz_problems[:5]:
        print(f"    {p[:300]}")
    print(f"fault matrix requests: {sum(fig.faults.values())}; Weir's own 500s: {fig.weir_500}")
    for k, v in sorted(fig.faults.items()):
        print(f"    {v:6d}  {k}")
    print(f"slow clients:          {sum(fig.slow.values())}; hung: {sum(v for k, v in fig.slow.items() if 'hung' in k)}")
    for k, v in sorted(fig.slow.items()):
        print(f"    {v:6d}  {k}")
    print(f"worker restarts:       {state.worker_restarts if state else 'unknown (supervisor state gone)'}")
    print(f"RSS (both workers):    {first[1] / 1024:.1f} MiB after warm-up → {last[1] / 1024:.1f} MiB at the end ({(last[1] - first[1]) / 1024:+.1f} MiB)")
    print(f"open fds (both):       {first[2]} after warm-up → {last[2]} at the end ({last[2] - first[2]:+d})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
