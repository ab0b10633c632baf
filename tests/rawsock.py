"""Raw-socket helpers for attack tests: bytes in, bytes out, judged strictly.

An attacker does not speak through httpx; these helpers send exactly the bytes
a test gives and read exactly what the server answers, then judge the answer
with h11 (a client role) so a malformed response fails the test, not a lenient
client. Shared by every raw-socket test (tests/test_attack.py and others).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio

__all__ = ["Answer", "Reply", "port_of", "exchange", "parse_replies", "read_reply", "well_formed"]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Answer:
    """What the server did with one connection."""

    raw: bytes
    closed: bool  # the server closed (EOF or reset) before the read deadline
    reset: bool = False
    replies: list[Reply] = field(default_factory=list)
    error: str | None = None  # why the bytes are not well-formed HTTP/1.1 responses


async def exchange(port: int, data: bytes | list[bytes], *, half_close: bool = True, read_s: float = 5.0, gap_s: float = 0.0, methods: list[bytes] | None = None, until_reply: bool = False) -> Answer:
    """Send ``data`` (chunks ``gap_s`` apart), optionally half-close, read until
    EOF or ``read_s`` (or, with ``until_reply``, until one whole reply). The
    answer's replies are parsed as responses to ``methods`` (default: GET for
    each), which matters only for HEAD."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    chunks = [data] if isinstance(data, bytes) else data
    raw = bytearray()
    closed = reset = False
    async with stream:
        try:
            for i, chunk in enumerate(chunks):
                if i and gap_s:
                    await trio.sleep(gap_s)
                await stream.send_all(chunk)
            if half_close:
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server may close before reading everything: judged below
        with trio.move_on_after(read_s):
            try:
                while True:
                    got = await stream.receive_some(65536)
                    if not got:
                        closed = True
                        break
                    raw += got
                    if until_reply and parse_replies(bytes(raw), methods)[0]:
                        break
            except trio.BrokenResourceError:
                closed = reset = True
    answer = Answer(bytes(raw), closed, reset)
    answer.replies, answer.error = parse_replies(answer.raw, methods)
    return answer


async def read_reply(stream: trio.abc.ReceiveStream) -> Reply:
    """Read exactly one whole response to a GET from a kept-alive connection."""
    raw = bytearray()
    while True:
        got = await stream.receive_some(65536)
        if not got:
            raise AssertionError(f"closed before a whole response: {bytes(raw)!r}")
        raw += got
        head, sep, rest = bytes(raw).partition(b"\r\n\r\n")
        if not sep:
            continue
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) >= length:
            replies, error = parse_replies(bytes(raw)[: len(head) + 4 + length] + b"")
            assert replies and error in (None, "response 1 incomplete"), (raw, error)
            return replies[0]


def parse_replies(raw: bytes, methods: list[bytes] | None = None) -> tuple[list[Reply], str | None]:
    """Parse ``raw`` as a sequence of complete HTTP/1.1 responses with h11.

    Returns the replies and, if the bytes are not a clean sequence of whole
    responses, a description of the first problem.
    """
    replies: list[Reply] = []
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    conn.receive_data(b"")  # whatever follows the last byte is EOF
    index = 0
    while True:
        method = (methods[index] if methods and index < len(methods) else b"GET")
        if not conn.trailing_data[0]:
            return replies, None  # a clean close after the last whole response
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, bytearray()
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    status, headers = event.status_code, {k: v for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    replies.append(Reply(status, headers, bytes(body)))
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return replies, None if not status else f"response {index} cut short"
                elif event is h11.NEED_DATA:
                    return replies, f"response {index} incomplete"
                # InformationalResponse (100 Continue): keep reading
        except h11.RemoteProtocolError as exc:
            return replies, f"response {index} malformed: {exc}"
        index += 1
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return replies, f"bytes after a closing response: {exc}"
            return replies, None if isinstance(event, h11.ConnectionClosed) else "bytes after a closing response"
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return replies, None


def well_formed(answer: Answer) -> str | None:
    """Why ``answer`` is not either whole responses or a clean close, or None."""
    if answer.error:
        return answer.error
    if not answer.closed and not answer.replies:
        return "no answer and no close within the read deadline"
    return None
