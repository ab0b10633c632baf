"""A recorded Anthropic stream answers a non-streamed request, and a recorded
body answers a streamed one: assemble(split(m)) == m."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.messages import assemble_message, split_message, stream_is_complete


def sse(name: str, obj: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()


# A stream shaped like Anthropic's real ones: ping, text in several deltas,
# a tool input split mid-token, CRLF framing on one event, a thinking block.
STREAM = [
    sse("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAh"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse("ping", {"type": "ping"}),
    sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking the "}}).replace(b"\n", b"\r\n"),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "weather."}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    sse("content_block_start", {"type": "content_block_start", "index": 2,
                                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": 'is", "days": 3}'}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 2}),
    sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 89}}),
    sse("message_stop", {"type": "message_stop"}),
]

EXPECTED = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [
        {"type": "thinking", "thinking": "Let me think.", "signature": "EqQBCgIYAh"},
        {"type": "text", "text": "Checking the weather."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 3}},
    ],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 89},
}


def test_a_real_shaped_stream_assembles_into_the_non_streamed_body():
    body = assemble_message(STREAM)
    assert json.loads(body) == EXPECTED
    assert list(json.loads(body)) == list(EXPECTED)  # Anthropic's key order, too


def test_citations_accumulate_on_their_text_block():
    events = [
        STREAM[0],
        sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "", "citations": []}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": {"type": "char_location", "cited_text": "a"}}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "A."}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        STREAM[-2], STREAM[-1],
    ]
    block = json.loads(assemble_message(events))["content"][0]
    assert block == {"type": "text", "text": "A.", "citations": [{"type": "char_location", "cited_text": "a"}]}


def test_split_uses_anthropics_framing_and_sequence():
    events = split_message(json.dumps(EXPECTED).encode())
    names = [e.split(b"\n", 1)[0] for e in events]
    assert names == [b"event: " + n for n in (
        b"message_start", b"content_block_start", b"content_block_delta", b"content_block_delta", b"content_block_stop",
        b"content_block_start", b"content_block_delta", b"content_block_stop",
        b"content_block_start", b"content_block_delta", b"content_block_stop",
        b"message_delta", b"message_stop")]
    for e in events:
        head, data, tail = e.split(b"\n", 2)
        assert data.startswith(b"data: {") and tail == b"\n"
    start = json.loads(events[0].split(b"data: ", 1)[1])
    assert start["message"]["content"] == [] and start["message"]["stop_reason"] is None
    assert stream_is_complete(events)


def test_stream_completeness():
    assert stream_is_complete(STREAM)
    assert not stream_is_complete(STREAM[:-1])
    error = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert not stream_is_complete(STREAM[:5] + [error] + STREAM[5:])
    with pytest.raises(ValueError):
        assemble_message(STREAM[:5] + [error])
    with pytest.raises(ValueError):
        assemble_message(STREAM[1:])


# -- round trip over generated messages ----------------------------------------

text = st.text(max_size=30)
json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | text
tool_inputs = st.dictionaries(st.text(min_size=1, max_size=8), st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8), max_size=4)
citation = st.fixed_dictionaries({"type": st.just("char_location"), "cited_text": text, "start_char_index": st.integers(0, 99)})

blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("text"), "text": text, "citations": st.lists(citation, max_size=2)}),
    st.fixed_dictionaries({"type": st.just("thinking"), "thinking": text, "signature": text}),
    st.fixed_dictionaries({"type": st.just("redacted_thinking"), "data": text}),
    st.fixed_dictionaries({"type": st.sampled_from(["tool_use", "server_tool_use"]),
                           "id": text, "name": text, "input": tool_inputs}),
)
messages = st.fixed_dictionaries({
    "id": text, "type": st.just("message"), "role": st.just("assistant"), "model": text,
    "content": st.lists(blocks, max_size=5),
    "stop_reason": st.sampled_from(["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", None]),
    "stop_sequence": st.none() | text,
    "usage": st.fixed_dictionaries({"input_tokens": st.integers(0, 10**6), "output_tokens": st.integers(0, 10**6)},
                                   optional={"cache_read_input_tokens": st.integers(0, 10**6),
                                             "cache_creation_input_tokens": st.integers(0, 10**6)}),
})


@settings(max_examples=300, deadline=None)
@given(message=messages)
def test_assemble_of_split_is_the_identity(message):
    events = split_message(json.dumps(message).encode())
    assert stream_is_complete(events)
    assert json.loads(assemble_message(events)) == message


@settings(max_examples=100, deadline=None)
@given(message=messages)
def test_split_of_assemble_reproduces_the_event_stream(message):
    events = split_message(json.dumps(message).encode())
    assert split_message(assemble_message(events)) == events


# -- only well-formed streams are worth storing ----------------------------------


def _broken(events: list[bytes], at: int, replacement: bytes | None) -> list[bytes]:
    out = list(events)
    if replacement is None:
        del out[at]
    else:
        out[at:at] = [replacement]
    return out


@pytest.mark.parametrize(
    "mutate",
    [
        # The mock's "malformed" fault: a delta whose JSON is cut off.
        lambda e: _broken(e, 4, b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":\n\n'),
        lambda e: _broken(e, 4, b"event: content_block_delta\ndata: not json\n\n"),
        lambda e: _broken(e, 4, b"event: content_block_delta\n\n"),  # no data at all
        lambda e: _broken(e, 4, sse("content_block_delta", {"type": "content_block_delta", "index": 7, "delta": {"type": "text_delta", "text": "x"}})),
        lambda e: _broken(e, 4, sse("content_block_delta", {"type": "message_stop"})),  # name and type disagree
        lambda e: _broken(e, 4, sse("message_start", {"type": "message_start", "message": {}})),  # a second start
        lambda e: _broken(e, len(e), sse("content_block_start", {"type": "content_block_start", "index": 9, "content_block": {"type": "text", "text": ""}})),  # after the stop
        lambda e: [x for x in e if b"content_block_stop" not in x],  # blocks never closed
        lambda e: [x for x in e if b"message_delta" not in x],
        lambda e: [x for x in e if b"message_start" not in x],
    ],
)
def test_a_stream_that_breaks_the_grammar_is_not_complete(mutate) -> None:  # type: ignore[no-untyped-def]
    assert stream_is_complete(STREAM)
    assert not stream_is_complete(mutate(STREAM))


def test_pings_comments_and_unknown_events_keep_a_stream_well_formed() -> None:
    extra = [b": keep-alive\n\n", sse("ping", {"type": "ping"}), sse("future_event", {"type": "future_event", "detail": 1})]
    events = [STREAM[0], *extra, *STREAM[1:-1], *extra, STREAM[-1]]
    assert stream_is_complete(events)
