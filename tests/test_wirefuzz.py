"""The mutation fuzzer (tests/wirefuzz.py) against a real worker, in virtual time:
a few hundred seeded cases, each a well-formed answer or a clean close, no 5xx,
and the worker still serving at the end with nothing needing containment."""

from __future__ import annotations

import logging
import os

import pytest
import trio
import trio.testing

from .harness import weir_and_mock
from .rawsock import exchange, port_of
from .wirefuzz import cases, run_case

# Issue 8's number; any seed must pass: WEIR_FUZZ_SEED / WEIR_FUZZ_CASES explore further.
SEED = int(os.environ.get("WEIR_FUZZ_SEED", "8"))
CASES = int(os.environ.get("WEIR_FUZZ_CASES", "300"))


async def test_mutated_requests_get_whole_answers_or_a_clean_close(autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="weir.server")
    problems: list[str] = []
    async with weir_and_mock(auth={"admin_key": "admin"}) as (weir, _):
        port = port_of(weir.url)
        todo = cases(SEED, CASES)
        limit = trio.Semaphore(16)

        async def one(case) -> None:  # type: ignore[no-untyped-def]
            async with limit:
                # Past every server deadline (head 10 s, body idle 60 s, keep-alive 75 s):
                # a connection still open and silent then is a hung one.
                problem = await run_case(port, case, read_s=120)
            if problem:
                problems.append(problem)

        async with trio.open_nursery() as nursery:
            for case in todo:
                nursery.start_soon(one, case)
        health = await exchange(port, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", half_close=False)
        assert health.replies and health.replies[0].status == 200
    assert not problems, "\n".join(problems[:10])
    assert not [r for r in caplog.records if r.name == "weir.server"], [r.getMessage() for r in caplog.records]
