"""Token usage read off a reply as it streams by, sans-IO.

The rate limiter admits a request on an estimate and settles on what the
upstream reports. This reads only that: the ``usage`` object of a JSON body,
or ``message_start``/``message_delta`` usage in a stream. Only events that
mention usage are decoded; every other byte passes unread.
"""

from __future__ import annotations

import msgspec

from .sse import SSEParser

__all__ = ["UsageMeter", "estimate_input_tokens", "CHARS_PER_TOKEN"]

# English text and JSON run ~4 characters per token, by Anthropic's and
# OpenAI's own rules of thumb. Every token estimate in Weir uses this one
# figure: rate-limit admission (bytes of the body), count_tokens for targets
# that have none, output tokens of a stream that sent no usage. It only has
# to be fair until the real usage corrects it.
CHARS_PER_TOKEN = 4
# A usage object is at the end of a non-streamed body; bodies are small, but
# a pathological one is not worth buffering past this.
_BODY_LIMIT = 4 * 1024 * 1024


def estimate_input_tokens(body: bytes) -> int:
    return max(1, len(body) // CHARS_PER_TOKEN)


class _Usage(msgspec.Struct):
    # Anthropic's names…
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = 0
    cache_read_input_tokens: int | None = 0
    # …and OpenAI's, for /v1/chat/completions replies.
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def counts(self) -> tuple[int, int]:
        if self.prompt_tokens or self.completion_tokens:
            return self.prompt_tokens, self.completion_tokens
        return self.input_tokens + (self.cache_creation_input_tokens or 0), self.output_tokens


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    type: str = ""
    message: _Message | None = None
    usage: _Usage | None = None


_body = msgspec.json.Decoder(_Message)
_event = msgspec.json.Decoder(_Event)


class UsageMeter:
    """Feed the reply's chunks; read ``tokens`` at the end.

    Counts input + cache-creation + output tokens, and not cache reads, as
    Anthropic's own input-token limits do. Reads OpenAI's usage too (the
    chat-completions ingress): ``prompt_tokens`` + ``completion_tokens``.
    """

    __slots__ = ("_sse", "_parser", "_parts", "_size", "input", "output", "cache_read", "cache_creation")

    def __init__(self, sse: bool) -> None:
        self._sse = sse
        self._parser = SSEParser() if sse else None
        self._parts: list[bytes] = []
        self._size = 0
        self.input = 0
        self.output = 0
        # Broken out for the ledger's cost (cache reads and writes are priced
        # apart); ``input`` above includes the cache writes.
        self.cache_read = 0
        self.cache_creation = 0

    def feed(self, chunk: bytes) -> None:
        if self._parser is None:
            if self._size < _BODY_LIMIT:
                self._parts.append(chunk)
                self._size += len(chunk)
            return
        for ev in self._parser.feed(chunk):
            if b'"usage"' in ev.data:
                self._read_event(ev.data)

    def _read_event(self, data: bytes) -> None:
        try:
            ev = _event.decode(data)
        except msgspec.MsgspecError:
            return
        usage = ev.message.usage if ev.message is not None else ev.usage
        if usage is None:
            return
        if ev.type == "message_delta":
            # message_delta carries the cumulative output count.
            self.output = max(self.output, usage.output_tokens)
        else:  # message_start, or OpenAI's final usage chunk
            self._take(usage)

    def _take(self, usage: _Usage) -> None:
        self.input, self.output = usage.counts()
        self.cache_read = usage.cache_read_input_tokens or 0
        self.cache_creation = usage.cache_creation_input_tokens or 0

    def counts(self) -> tuple[int, int]:
        """(input, output) tokens, once the reply has been fed whole."""
        if self._parser is None and self._parts:
            try:
                usage = _body.decode(b"".join(self._parts)).usage
            except msgspec.MsgspecError:
                usage = None
            self._parts = []
            if usage is not None:
                self._take(usage)
        return self.input, self.output

    @property
    def tokens(self) -> int:
        i, o = self.counts()
        return i + o
