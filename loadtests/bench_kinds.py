"""Micro-benchmark: the request-kind classifier on Claude-Code-shaped bodies.

The classifier runs on every ``/v1/messages`` request, after the envelope
decode it reuses; this prints its cost per body next to the decode's, so a
change that makes it read more than it must shows up as a ratio.

    .venv/bin/python -m loadtests.bench_kinds
"""

from __future__ import annotations

import json
import timeit

from loadtests.payload import claude_code_body
from proxy.ingress.anthropic import decode_messages
from proxy.kinds import classify

_SIDE_CALLS = {
    "quota_probe": {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "quota"}]},
    "title": {
        "model": "m",
        "max_tokens": 512,
        "system": [{"type": "text", "text": "Generate a concise, sentence-case title (3-7 words) for this coding session."}],
        "messages": [{"role": "user", "content": "add request kinds"}],
    },
}


def _time(fn, number: int) -> float:  # type: ignore[no-untyped-def]
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    body = claude_code_body(stream=True)
    env = decode_messages(body)
    decode_us = _time(lambda: decode_messages(body), 1000)
    print(f"envelope decode, {len(body)} B Claude Code body: {decode_us:8.2f} us")
    print(f"classify, same body ({classify(env)}): {_time(lambda: classify(env), 20000):8.2f} us")
    # A turn whose last message is a whole file read: the classifier looks at its two ends only.
    huge = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "read it"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "x " * 250_000}]}
    big = decode_messages(json.dumps(huge).encode())
    print(f"classify, 500 KB last message ({classify(big)}): {_time(lambda: classify(big), 2000):8.2f} us")
    for name, doc in _SIDE_CALLS.items():
        side = decode_messages(json.dumps(doc).encode())
        print(f"classify, {name:12s} ({classify(side)}): {_time(lambda: classify(side), 20000):8.2f} us")


if __name__ == "__main__":
    main()
