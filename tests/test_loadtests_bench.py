"""The benchmark's own parts: what it posts, how it reads wrk and /proc, the floor app.

A benchmark that misreads wrk ("1.20s" taken as 1.2 ms) or posts a body the
upstream rejects produces confident, wrong numbers; these tests pin the
parsing to real wrk output and the payload to what Weir and the mock accept.
The one test that runs wrk drives the real floor app under Hypercorn for a
second, proving the generated Lua script and the parser work together.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import partial

import pytest
import trio

from loadtests import bench, floor
from loadtests.payload import ANTHROPIC_BETA, claude_code_body, claude_code_headers, count_tokens_body
from proxy.ingress.anthropic import decode_count_tokens, decode_messages
from mock import MockCore, MockSettings, RecordedRequest
from proxy.sse import SSEParser

# Captured from wrk 4.1.0 (Debian) against a failing server: every line the parser reads.
WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:18080
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   244.42ms  180.12ms   1.20s    71.00%
    Req/Sec   136.43     43.44   202.00     71.74%
  Latency Distribution
     50%  204.42ms
     75%  310.01ms
     90%  512.00us
     99%    1.20s
  657 requests in 5.07s, 1.15MB read
  Socket errors: connect 0, read 2, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:    129.58
Transfer/sec:    232.45KB
"""


# ------------------------------------------------------------------ payload


def test_claude_code_body_has_claude_codes_shape_and_size():
    body = claude_code_body(stream=True)
    assert 30_000 <= len(body) <= 60_000
    doc = json.loads(body)
    assert doc["stream"] is True
    assert len(doc["tools"]) >= 12
    assert all("input_schema" in t and t["input_schema"]["properties"] for t in doc["tools"])
    assert all(block["type"] == "text" for block in doc["system"])
    assert doc["thinking"] == {"type": "adaptive"} and doc["output_config"]["effort"]
    assert doc["metadata"]["user_id"] and doc["model"] == "claude-opus-5-5" and doc["max_tokens"] == 128000
    roles = [m["role"] for m in doc["messages"]]
    assert roles[-1] == "user" and len(roles) >= 5 and roles[1] == "system"  # Claude Code 2.x's mid-conversation system item
    assert "stream" not in json.loads(claude_code_body(stream=False))
    # Seeded: the same body on every run, so runs compare.
    assert claude_code_body(stream=True) == body
    assert claude_code_body(stream=True, seed=1) != body


def test_claude_code_headers_carry_version_beta_and_key():
    headers = claude_code_headers()
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == ANTHROPIC_BETA and ANTHROPIC_BETA.count(",") == 7  # eight betas
    assert headers["x-api-key"]


def test_weir_and_the_mock_accept_the_bodies_and_stream_about_100_deltas():
    body = claude_code_body(stream=True)
    env = decode_messages(body)
    assert env.stream and env.model
    assert decode_count_tokens(count_tokens_body()).model == env.model

    core = MockCore(MockSettings(output_tokens=100))
    plan = core.respond(RecordedRequest("POST", "/v1/messages", "beta=true", [], body))
    assert plan.status == 200 and plan.events is not None
    names = [e.event for e in SSEParser().feed(b"".join(data for data, _ in plan.events))]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("content_block_delta") >= 100
    # Text, not a tool call: the body must not trip the mock's tool rule.
    assert "tool_use" not in json.dumps([json.loads(data.split(b"data: ", 1)[1]) for data, _ in plan.events])

    plain = core.respond(RecordedRequest("POST", "/v1/messages", "", [], claude_code_body(stream=False)))
    assert plain.status == 200 and plain.events is None and b'"type":"message"' in plain.body
    counted = core.respond(RecordedRequest("POST", "/v1/messages/count_tokens", "", [], count_tokens_body()))
    assert counted.status == 200 and b"input_tokens" in counted.body


# ------------------------------------------------------------------ wrk


@pytest.mark.parametrize(
    ("text", "ms"),
    [("512.00us", 0.512), ("1.23ms", 1.23), ("1.20s", 1200.0), ("2.00m", 120_000.0), ("7ms", 7.0)],
)
def test_wrk_durations_convert_to_ms(text, ms):
    assert bench.parse_duration_ms(text) == pytest.approx(ms)


def test_parse_duration_refuses_unknown_units():
    with pytest.raises(ValueError):
        bench.parse_duration_ms("12parsecs")


def test_parse_wrk_reads_rate_percentiles_and_failures():
    r = bench.parse_wrk(WRK_OUTPUT)
    assert r.requests == 657
    assert r.elapsed_s == pytest.approx(5.07)
    assert r.rps == pytest.approx(129.58)
    assert r.p50_ms == pytest.approx(204.42)
    assert r.p99_ms == pytest.approx(1200.0)
    assert r.non2xx == 5
    assert r.socket_errors == {"read": 2, "timeout": 12}
    assert r.failures == 19


def test_parse_wrk_clean_run_has_no_failures():
    clean = WRK_OUTPUT.replace("  Socket errors: connect 0, read 2, write 0, timeout 12\n", "").replace(
        "  Non-2xx or 3xx responses: 5\n", ""
    )
    r = bench.parse_wrk(clean)
    assert r.failures == 0 and r.non2xx == 0 and r.socket_errors == {}


def test_parse_wrk_without_latency_flag_fails_loudly():
    without = "\n".join(line for line in WRK_OUTPUT.splitlines() if "%  " not in line)
    with pytest.raises(ValueError, match="--latency"):
        bench.parse_wrk(without)


def test_lua_script_escapes_and_adds_delay_only_when_asked():
    script = bench.lua_script('/tmp/a "b"/body.json', "/v1/messages?beta=true", {"x-q": 'say "hi"\\'}, delay_ms=0)
    assert 'wrk.headers["x-q"] = "say \\"hi\\"\\\\"' in script
    assert 'io.open("/tmp/a \\"b\\"/body.json", "rb")' in script
    assert "delay" not in script
    assert "function delay()\n  return 27\nend" in bench.lua_script("/b", "/", {}, delay_ms=27)


# ------------------------------------------------------------------ /proc


def test_proc_stat_cpu_counts_fields_after_the_command_name():
    # A command name with spaces and parentheses must not shift the fields.
    fields = ["S", "1", "1", "1", "0", "-1", "4194560", "10", "0", "0", "0", "250", "150"] + ["0"] * 30
    text = "4242 (weir (worker) 1) " + " ".join(fields)
    assert bench.read_proc_stat_cpu(text) == pytest.approx(400 / bench.CLK_TCK)


def test_vm_hwm_and_cpu_lines():
    assert bench.read_vm_hwm_kib("Name:\tpython\nVmPeak:\t 9 kB\nVmHWM:\t  65432 kB\nVmRSS:\t 1 kB\n") == 65432
    assert bench.read_vm_hwm_kib("Name:\tzombie\n") == 0
    stat = "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\ncpu1 10 0 10 980 0 0 0 0 0 0\nintr 1\n"
    cores = bench.parse_cpu_lines(stat)
    assert set(cores) == {"cpu0", "cpu1"}
    assert cores["cpu0"] == (pytest.approx(150 / bench.CLK_TCK), pytest.approx(1000 / bench.CLK_TCK))


def test_sample_sees_this_process_burn_cpu():
    before = bench._sample_sync(os.getpid())
    digest = b""
    while bench._sample_sync(os.getpid()).cpu_s - before.cpu_s < 0.05:
        for _ in range(2000):
            digest = hashlib.sha256(digest).digest()
    after = bench._sample_sync(os.getpid())
    assert after.cpu_s - before.cpu_s >= 0.05
    assert after.hwm_kib > 1000  # a Python process holds megabytes
    assert os.getpid() in after.pids


# ------------------------------------------------------------------ slow stream, report


def test_relay_delays_measures_each_event_against_its_direct_twin():
    direct = [0.000, 0.050, 0.100, 0.150]
    weir = [0.003, 0.051, 0.102, 0.158]
    d = bench.relay_delays(direct, weir)
    assert d["events"] == 4
    assert d["first_ms"] == pytest.approx(3.0)
    assert d["max_ms"] == pytest.approx(8.0)
    assert d["median_ms"] == pytest.approx(2.5)
    with pytest.raises(ValueError):
        bench.relay_delays(direct, weir[:3])


def test_markdown_report_shows_every_row_and_shouts_failures():
    row = {"name": "Weir", "connections": 32, "rps": 281.4, "p50_ms": 96.2, "p99_ms": 393.4, "failures": 3, "cpu_s_per_1k": 1.517}
    report = {
        "meta": {"timestamp": "t", "pinning": "Pinned", "body_bytes": 45081, "events_per_stream": 159, "duration_s": 10},
        "scenarios": [row, dict(row, name="floor (raw ASGI)", failures=0)],
        "summary": {"weir_vs_floor": 0.24, "added_ns": {"rps": 80, "p50_ms": 4.7, "p99_ms": 9.5}},
        "failures": ["Weir: 3 non-2xx responses"],
        "warnings": [],
    }
    md = bench.render_markdown(report)
    assert "| Weir | 32 | 281 | 96.20 | 393.40 | **3** | 1.517 |" in md
    assert "| floor (raw ASGI) | 32 | 281 | 96.20 | 393.40 | 0 |" in md
    assert "**0.24×**" in md and "p50 **+4.70 ms**" in md
    assert "- **Weir: 3 non-2xx responses**" in md


# ------------------------------------------------------------------ floor


async def test_floor_drains_a_chunked_body_then_replies_once():
    chunks = [b"a" * 20_000, b"b" * 20_000, b"c" * 5_000]
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    await floor.app({"type": "http", "method": "POST", "path": "/v1/messages"}, receive, send)
    assert incoming == []  # every chunk read
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    body = sent[1]["body"]
    assert 300 <= len(body) <= 600 and json.loads(body)["type"] == "message"
    assert dict(sent[0]["headers"])[b"content-length"] == b"%d" % len(body)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
async def test_wrk_script_posts_the_whole_body_to_the_floor(tmp_path):
    from hypercorn.config import Config
    from hypercorn.trio import serve

    seen: list[int] = []

    async def counting(scope, receive, send):
        if scope["type"] != "http":
            return await floor.app(scope, receive, send)
        size = 0
        while True:
            msg = await receive()
            size += len(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        seen.append(size)
        await send(floor._START)
        await send(floor._BODY)

    body = claude_code_body(stream=False)
    (tmp_path / "body.json").write_bytes(body)
    script = tmp_path / "post.lua"
    script.write_text(bench.lua_script(str(tmp_path / "body.json"), "/v1/messages?beta=true", claude_code_headers()))

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, counting, config, mode="asgi"))
        url = binds[0]
        result = await bench.run_wrk(url, script, connections=2, duration_s=1)
        nursery.cancel_scope.cancel()
    assert result.requests > 0 and result.failures == 0
    assert result.p50_ms > 0 and result.p99_ms >= result.p50_ms
    assert len(seen) >= result.requests and set(seen) == {len(body)}


# ------------------------------------------------------------------ results


def test_a_run_is_recorded_outside_git_and_latest_changes_only_with_save(tmp_path):
    from loadtests.record import record

    first = record("bench", "latest", {"json": "{}\n", "md": "# run 1\n"}, save=False, out=tmp_path)
    assert [p.parent.name for p in first] == ["runs", "runs"] and not (tmp_path / "latest.md").exists()
    saved = record("bench", "latest", {"json": "{}\n", "md": "# run 2\n"}, save=True, out=tmp_path)
    assert (tmp_path / "latest.md").read_text() == "# run 2\n" and tmp_path / "latest.json" in saved


@pytest.mark.skipif(shutil.which("git") is None or not (bench.ROOT / ".git").exists(), reason="not a git checkout")
def test_benchmark_runs_and_the_locust_venv_are_ignored_by_git():
    import subprocess

    paths = ["loadtests/results/runs/bench-20260101-000000.json", ".venv-load/bin/locust"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=bench.ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == paths
    tracked = subprocess.run(["git", "check-ignore", "--no-index", "loadtests/results/latest.json"], cwd=bench.ROOT, capture_output=True)
    assert tracked.returncode == 1  # the committed figures stay tracked
