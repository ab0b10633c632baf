"""What the ingress's body checks cost on a Claude-Code-shaped body.

Run: ``.venv/bin/python loadtests/bench_envelope.py [--bytes 45000] [--number 2000]``

Times, per call and best of five rounds: the Messages envelope decode alone
(msgspec, the floor), the duplicate-key check every body pays, the whole
``decode_messages``; then, for the stages that read a body whole,
``json.loads`` alone against ``loads_object`` (the same plus the
``MAX_DEPTH`` scan) — on the benchmark's body and on the same body with
code in it (escaped quotes and backslashes, which the depth scan must step
over).
"""

from __future__ import annotations

import argparse
import json
import timeit

from loadtests.payload import claude_code_body
from proxy.ingress.anthropic import _messages_decoder, decode_messages
from proxy.ingress.structure import duplicate_top_level_key, loads_object, nesting_depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=45_000)
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args()
    plain = claude_code_body(True, target_bytes=args.bytes)
    doc = json.loads(plain)
    doc["messages"].append({"role": "user", "content": 'print("a\\\\b")\n' * 200})
    with_code = json.dumps(doc, ensure_ascii=False).encode()
    for name, body in (("claude code body", plain), ("… with code in it", with_code)):
        print(f"{name}: {len(body):,} bytes, depth {nesting_depth(body)}")
        for label, stmt in (
            ("envelope decode (msgspec)", lambda: _messages_decoder.decode(body)),
            ("duplicate_top_level_key", lambda: duplicate_top_level_key(body)),
            ("decode_messages (all)", lambda: decode_messages(body)),
            ("json.loads", lambda: json.loads(body)),
            ("nesting_depth", lambda: nesting_depth(body)),
            ("loads_object (all)", lambda: loads_object(body)),
        ):
            t = min(timeit.repeat(stmt, number=args.number, repeat=5)) / args.number * 1e6
            print(f"  {label:28s} {t:8.1f} µs")


if __name__ == "__main__":
    main()
