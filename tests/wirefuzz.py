"""A byte-mutation fuzzer for HTTP/1.1 requests, over real sockets.

Seeds are well-formed requests to every kind of route; each case mutates one
or two of them (bytes flipped, inserted, deleted, duplicated, truncated,
spliced, numbers in framing headers changed) with a seeded ``random.Random``,
so a failing case is replayed from its seed and index. Used by the suite
(tests/test_wirefuzz.py, a few hundred cases) and by ``loadtests/soak`` (as
many as its minutes allow).

The verdict is the contract a stranger gets: whole, well-formed HTTP responses
or a clean close, never a 5xx, never a connection left hanging.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .rawsock import Answer, exchange, well_formed

__all__ = ["SEEDS", "Case", "cases", "judge", "run_case"]

_BODY = b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
_CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nhost: weir\r\nx-api-key: sk-fuzz\r\nanthropic-version: 2023-06-01\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


def _chunked(path: bytes, body: bytes) -> bytes:
    half = len(body) // 2
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
    return b"POST " + path + b" HTTP/1.1\r\nhost: weir\r\nx-api-key: sk-fuzz\r\ntransfer-encoding: chunked\r\n\r\n" + chunks


SEEDS: list[bytes] = [
    b"GET /health HTTP/1.1\r\nhost: weir\r\n\r\n",
    b"GET /ready HTTP/1.0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: weir\r\nconnection: close\r\n\r\n",
    b"GET /admin/stats HTTP/1.1\r\nhost: weir\r\nx-api-key: admin\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nhost: weir\r\nx-api-key: sk-fuzz\r\n\r\n",
    b"GET /v1/models/claude-sonnet-4-5?beta=true HTTP/1.1\r\nhost: weir\r\nx-api-key: sk-fuzz\r\n\r\n",
    _post(b"/v1/messages", _BODY),
    _post(b"/v1/messages", _BODY[:-1] + b',"stream":true}'),
    _post(b"/v1/messages/count_tokens", _BODY),
    _post(b"/v1/chat/completions", _CHAT, b"authorization: Bearer sk-fuzz\r\n"),
    _post(b"/v1/messages", _BODY, b"connection: close\r\n"),
    _chunked(b"/v1/messages", _BODY),
    b"GET /health HTTP/1.1\r\nhost: weir\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: weir\r\nx-api-key: k\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nhost: weir\r\n\r\n",
]

_SPECIAL = [b"\r", b"\n", b"\r\n", b"\x00", b":", b" ", b"\t", b"\xff", b"%", b"/", b"..", b"%2F", b"0", b"-1", b"9" * 20, b"\r\n\r\n", b",", b'"', b"{", b"}"]
_FRAMING = [b"content-length: ", b"transfer-encoding: ", b"connection: ", b"expect: ", b"upgrade: "]
_FRAMING_VALUES = [b"0", b"1", b"-1", b"99999999999999999999", b"chunked", b"gzip, chunked", b"close", b"keep-alive", b"100-continue", b"h2c", b"websocket", b" 5", b"5, 6"]


@dataclass
class Case:
    index: int
    payload: bytes
    chunks: list[bytes]  # how the payload is written (segment boundaries matter)


def _mutate(rng: random.Random, data: bytearray) -> None:
    op = rng.randrange(9)
    pos = rng.randrange(len(data) + 1)
    if op == 0 and data:  # flip a byte
        data[min(pos, len(data) - 1)] = rng.randrange(256)
    elif op == 1:  # insert something with meaning to a parser
        data[pos:pos] = rng.choice(_SPECIAL)
    elif op == 2 and data:  # delete a run
        del data[pos : pos + rng.randrange(1, 8)]
    elif op == 3 and data:  # duplicate a run
        end = min(len(data), pos + rng.randrange(1, 64))
        data[end:end] = data[pos:end]
    elif op == 4:  # truncate
        del data[pos:]
    elif op == 5:  # a framing header, added or doubled
        line = rng.choice(_FRAMING) + rng.choice(_FRAMING_VALUES) + b"\r\n"
        head_end = data.find(b"\r\n") + 2 if b"\r\n" in data else 0
        data[head_end:head_end] = line
    elif op == 6:  # trailing bytes after the request
        data += rng.choice([b"GARBAGE", b"GET / HTTP/1.1\r\n\r\n", b"\r\n", b"\x00" * 8, bytes(rng.randrange(256) for _ in range(16))])
    elif op == 7:  # change the number after a content-length
        at = data.lower().find(b"content-length: ")
        if at >= 0:
            end = data.find(b"\r\n", at)
            data[at + 16 : end] = rng.choice(_FRAMING_VALUES[:4] + [str(rng.randrange(1000)).encode()])
    else:  # case and spacing games on the request line
        sp = data.find(b" ")
        if sp > 0:
            data[:sp] = rng.choice([b"GET", b"get", b"POST", b"PRI", b"CONNECT", b"G\x00T", b"X" * 40, b""])


def cases(seed: int, count: int, start: int = 0) -> list[Case]:
    """``count`` cases from ``seed``; case ``i`` depends only on (seed, i)."""
    out = []
    for i in range(start, start + count):
        rng = random.Random(f"{seed}:{i}")
        data = bytearray(rng.choice(SEEDS))
        if rng.random() < 0.1:
            data += rng.choice(SEEDS)  # pipelined
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            _mutate(rng, data)
        payload = bytes(data)
        if rng.random() < 0.3 and len(payload) > 2:
            cut = sorted(rng.sample(range(1, len(payload)), min(3, len(payload) - 1)))
            chunks = [payload[a:b] for a, b in zip([0, *cut], [*cut, len(payload)])]
        else:
            chunks = [payload]
        out.append(Case(i, payload, chunks))
    return out


def judge(case: Case, answer: Answer) -> str | None:
    """Why this answer breaks the contract, or None."""
    if b"HEAD" in case.payload.upper():
        # A reply to HEAD has no body; only the status lines can be judged.
        statuses = [int(line[9:12]) for line in answer.raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ") and line[9:12].isdigit()]
        if not answer.closed and not statuses:
            return "no answer and no close"
        return f"5xx: {statuses}" if any(s >= 500 for s in statuses) else None
    problem = well_formed(answer)
    if problem:
        return problem
    bad = [r.status for r in answer.replies if r.status >= 500]
    return f"5xx: {bad}" if bad else None


async def run_case(port: int, case: Case, read_s: float) -> str | None:
    answer = await exchange(port, case.chunks, half_close=False, read_s=read_s)
    problem = judge(case, answer)
    return None if problem is None else f"case {case.index}: {problem}; sent {case.payload[:300]!r}; got {answer.raw[:300]!r}"
