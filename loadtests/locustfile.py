"""Locust scenarios against a running Weir, with Claude-Code-sized requests.

``import locust`` monkey-patches the process with gevent, which breaks trio
(docs/ARCHITECTURE.md), so this file lives in its own venv and is never imported
by the tests. wrk (``loadtests/bench``) gives the headline throughput figures;
locust is for mixed, user-shaped traffic and watching a run live in its UI.

Set up once, from the repository root (``.venv-load/`` is ignored by git)::

    python3 -m venv .venv-load && .venv-load/bin/pip install -q locust

Run from the repository root against a Weir (for instance ``weir serve --port
8080`` with its built-in mock, or ``--upstream http://127.0.0.1:8081`` in
front of ``python -m mock --port 8081 --output-tokens 100``)::

    .venv-load/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 16 -r 16 -t 10s --only-summary            # the mix
    .venv-load/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 8 -r 8 -t 10s StreamingUser                # one scenario

User classes (pass one or more names to pick; none = all, weighted):
``MessagesUser`` (non-streamed), ``StreamingUser`` (streamed: reads every SSE
event and fails the request unless it ends with ``message_stop``),
``CountTokensUser`` and ``MixedUser`` (Claude Code's rough proportions: mostly
streamed turns, some count_tokens, a few non-streamed calls). A request with a
non-2xx status, or an SSE ``error`` event, counts as a failure.

Users send back to back (no wait): this is a load test, not a human pace.
``WEIR_API_KEY`` sets the x-api-key sent (default: a placeholder, enough for
Weir's passthrough mode in front of the mock).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from locust import FastHttpUser, constant, task

# payload.py is stdlib-only so this venv (without trio or msgspec) can import it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.payload import claude_code_body, claude_code_headers, count_tokens_body  # noqa: E402

_HEADERS = claude_code_headers(os.environ.get("WEIR_API_KEY", "sk-ant-api03-bench-not-a-real-key"))
_BODY = claude_code_body(stream=False)
_STREAM_BODY = claude_code_body(stream=True)
_COUNT_BODY = count_tokens_body()
_MESSAGES = "/v1/messages?beta=true"
_COUNT = "/v1/messages/count_tokens?beta=true"


class _Weir(FastHttpUser):
    abstract = True
    wait_time = constant(0)
    # Claude Code waits up to 10 minutes; a load test should see slowness as
    # latency, not as timeouts, and still not hang forever.
    network_timeout = 120.0
    connection_timeout = 10.0

    def messages(self) -> None:
        with self.client.post(_MESSAGES, data=_BODY, headers=_HEADERS, name="messages", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
            elif b'"type":"message"' not in (resp.content or b""):
                resp.failure("200 without a message body")

    def stream(self) -> None:
        with self.client.post(
            _MESSAGES, data=_STREAM_BODY, headers=_HEADERS, name="messages (stream)", stream=True, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            tail = b""
            for chunk in resp.iter_content(chunk_size=16384, decode_content=False):  # to the end, as a client reads
                tail = (tail + chunk)[-512:]
                if b"event: error" in chunk:
                    resp.failure("SSE error event")
                    return
            if b"event: message_stop" not in tail:
                resp.failure("stream ended without message_stop")

    def count_tokens(self) -> None:
        with self.client.post(_COUNT, data=_COUNT_BODY, headers=_HEADERS, name="count_tokens", catch_response=True) as resp:
            if resp.status_code != 200 or b"input_tokens" not in (resp.content or b""):
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")


class MessagesUser(_Weir):
    @task
    def non_streamed(self) -> None:
        self.messages()


class StreamingUser(_Weir):
    @task
    def streamed(self) -> None:
        self.stream()


class CountTokensUser(_Weir):
    @task
    def counted(self) -> None:
        self.count_tokens()


class MixedUser(_Weir):
    """Claude Code's rough shape: streamed turns dominate; token counts and short
    non-streamed calls (titles, summaries) come between them."""

    weight = 3  # when all classes run, the mix is the main traffic

    @task(6)
    def streamed(self) -> None:
        self.stream()

    @task(2)
    def counted(self) -> None:
        self.count_tokens()

    @task(1)
    def non_streamed(self) -> None:
        self.messages()
