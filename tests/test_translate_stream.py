"""Streams across the translation boundary.

An OpenAI-compatible upstream streams chunks; an Anthropic client must get a
stream its SDK accepts — and the reverse for the chat-completions ingress.
Table tests pin exact shapes; Hypothesis properties throw random chunk
sequences (interleaved kinds, several tool calls, cut-offs, errors) at both
translators and check every output against the grammar in
``tests/validate.py`` and against the content that went in.

``WEIR_HYPOTHESIS_EXAMPLES`` raises the example count for a long run (the
default keeps the file fast).
"""

from __future__ import annotations

import json
import os

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from proxy.sse import SSEParser
from proxy.translate import AnthropicStreamToOpenAI, OpenAIStreamToAnthropic

from .validate import MalformedStream, validate_anthropic_stream, validate_openai_stream

EXAMPLES = int(os.environ.get("WEIR_HYPOTHESIS_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chunk(delta=None, finish=None, usage=None, *, choices=True, id_="chatcmpl-abc", **extra):
    c = {"id": id_, "object": "chat.completion.chunk", "created": 1, "model": "meta/llama"}
    c["choices"] = [{"index": 0, "delta": delta if delta is not None else {}, "finish_reason": finish, **extra}] if choices else []
    if usage is not None:
        c["usage"] = usage
    return c


def run(chunks, *, end="finish", **kw):
    t = OpenAIStreamToAnthropic(model="claude-sonnet-4-5", **kw)
    out = []
    for c in chunks:
        out += t.feed(c)
    out += t.finish() if end == "finish" else t.error("overloaded_error", "upstream went away")
    return out


def events(out):
    parsed = SSEParser().feed(b"".join(out))
    return [(e.event, json.loads(e.data)) for e in parsed]


def sdk_message(out):
    """What the anthropic SDK itself assembles from our bytes — the real client's view."""
    snapshot, bufs = None, {}
    for name, data in events(out):
        if name == "ping":
            continue
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def tool_call(index, id_=None, name=None, args=""):
    call = {"index": index, "function": {"arguments": args}}
    if id_:
        call.update(id=id_, type="function")
        call["function"]["name"] = name
    return call


# ------------------------------------------------------------ OpenAI → Anthropic, tables

USAGE = {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129, "prompt_tokens_details": {"cached_tokens": 100}}


def test_text_stream_has_anthropics_exact_event_sequence():
    out = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hello"}),
            chunk({"content": ", world"}),
            chunk({}, "stop"),
            chunk(usage=USAGE, choices=False),
        ],
        input_tokens_estimate=77,
    )
    names = [n for n, _ in events(out)]
    assert names == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    ev = dict(events(out)[:1])
    start = ev["message_start"]["message"]
    assert start["id"] == "msg_chatcmpl-abc" and start["model"] == "claude-sonnet-4-5"
    assert start["usage"]["input_tokens"] == 77 and start["usage"]["output_tokens"] == 0
    delta = events(out)[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    # OpenAI's prompt_tokens includes cached ones; Anthropic counts them apart.
    assert delta["usage"] == {"input_tokens": 20, "output_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100}
    msg = validate_anthropic_stream(out)
    assert msg["content"] == [{"type": "text", "text": "Hello, world"}]
    assert sdk_message(out).content[0].text == "Hello, world"


def test_vllm_reasoning_text_and_tool_call_become_three_blocks():
    out = run(
        [
            chunk({"role": "assistant", "reasoning_content": "Need the "}),
            chunk({"reasoning_content": "file list."}),
            chunk({"content": "Let me look."}),
            chunk({"tool_calls": [tool_call(0, "call_1", "Bash", '{"comm')]}),
            chunk({"tool_calls": [tool_call(0, args='and": "ls -la"}')]}),
            chunk({}, "tool_calls"),
        ]
    )
    msg = validate_anthropic_stream(out)
    assert msg["content"] == [
        {"type": "thinking", "thinking": "Need the file list.", "signature": ""},
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls -la"}},
    ]
    assert msg["stop_reason"] == "tool_use"
    # The thinking block closes the way Anthropic's do: a signature_delta, then stop.
    evs = events(out)
    i = next(k for k, (n, d) in enumerate(evs) if n == "content_block_stop")
    assert evs[i - 1][1]["delta"] == {"type": "signature_delta", "signature": ""}
    sdk = sdk_message(out)
    assert [b.type for b in sdk.content] == ["thinking", "text", "tool_use"]
    assert sdk.content[2].input == {"command": "ls -la"} and sdk.stop_reason == "tool_use"


THINKING_NIM_REPLY = (
    '<think>\nThe user wants a.py.\n</think>\n\nLet me read it.\n'
    '<tool_call>\n{"name": "Read", "arguments": {"file_path": "a.py"}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_think_and_tool_call_tags_split_anywhere_become_blocks(size):
    pieces = [THINKING_NIM_REPLY[i : i + size] for i in range(0, len(THINKING_NIM_REPLY), size)]
    out = run([chunk({"role": "assistant", "content": ""}), *[chunk({"content": p}) for p in pieces], chunk({}, "stop")], tool_names=frozenset({"Read"}))
    msg = validate_anthropic_stream(out)
    assert msg["content"] == [
        {"type": "thinking", "thinking": "The user wants a.py.", "signature": ""},
        {"type": "text", "text": "Let me read it."},
        {"type": "tool_use", "id": "toolu_msg_chatcmpl-abc_t0", "name": "Read", "input": {"file_path": "a.py"}},
    ]
    assert msg["stop_reason"] == "tool_use"
    sdk = sdk_message(out)
    assert [b.type for b in sdk.content] == ["thinking", "text", "tool_use"] and sdk.content[2].input == {"file_path": "a.py"}


def test_omitted_thinking_sends_no_thinking_block():
    out = run(
        [chunk({"role": "assistant", "reasoning_content": "hmm"}), chunk({"content": "<think>x</think>Hi"}), chunk({}, "stop")],
        omit_thinking=True,
    )
    assert validate_anthropic_stream(out)["content"] == [{"type": "text", "text": "Hi"}]


def test_a_stream_cut_inside_a_tool_call_tag_keeps_the_text():
    out = run([chunk({"role": "assistant", "content": 'ok\n<tool_call>{"name": "Re'}), chunk({}, "length")], tool_names=frozenset({"Read"}))
    msg = validate_anthropic_stream(out)
    assert msg["content"] == [{"type": "text", "text": 'ok\n<tool_call>{"name": "Re'}] and msg["stop_reason"] == "max_tokens"


def test_openrouter_reasoning_field_is_read_too():
    msg = validate_anthropic_stream(run([chunk({"reasoning": "hmm"}), chunk({"content": "ok"}, "stop")]))
    assert [b["type"] for b in msg["content"]] == ["thinking", "text"]


def test_two_tool_calls_ending_and_starting_in_one_chunk():
    out = run(
        [
            chunk({"tool_calls": [tool_call(0, "call_a", "Read", '{"path":')]}),
            chunk({"tool_calls": [tool_call(0, args=' "a.py"}'), tool_call(1, "call_b", "Read", '{"path": "b.py"}')]}),
            chunk({}, "tool_calls"),
        ]
    )
    msg = validate_anthropic_stream(out)
    assert [(b["id"], b["input"]) for b in msg["content"]] == [("call_a", {"path": "a.py"}), ("call_b", {"path": "b.py"})]


def test_ollama_stop_with_tool_calls_still_means_tool_use():
    out = run([chunk({"tool_calls": [tool_call(0, "c", "Glob", '{"pattern": "*.py"}')]}, "stop")])
    assert validate_anthropic_stream(out)["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("finish", "extra", "stop_reason", "stop_sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("length", {}, "max_tokens", None),
        ("content_filter", {}, "refusal", None),
        ("stop", {"stop_reason": "\n\nHuman:"}, "stop_sequence", "\n\nHuman:"),  # vLLM names the matched stop
        ("stop", {"stop_reason": 128009}, "end_turn", None),  # vLLM: a stop *token* id is a natural end
    ],
)
def test_finish_reasons(finish, extra, stop_reason, stop_sequence):
    out = run([chunk({"content": "x"}), chunk({}, finish, **extra)])
    msg = validate_anthropic_stream(out)
    assert (msg["stop_reason"], msg["stop_sequence"]) == (stop_reason, stop_sequence)


def test_without_a_usage_chunk_output_tokens_are_estimated_not_zero():
    out = run([chunk({"content": "x" * 40}, "stop")])
    assert validate_anthropic_stream(out)["usage"]["output_tokens"] == 10


def test_upstream_failure_mid_stream_is_an_error_event_and_nothing_else():
    t = OpenAIStreamToAnthropic(model="m")
    out = t.feed(chunk({"content": "partial"}))
    out += t.error("overloaded_error", "upstream 503")
    names = [n for n, _ in events(out)]
    assert names[-1] == "error" and "content_block_stop" not in names and "message_delta" not in names
    assert events(out)[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": "upstream 503"}}
    assert validate_anthropic_stream(out)["error"]["type"] == "overloaded_error"
    assert t.feed(chunk({"content": "late"})) == [] and t.finish() == [] and t.error("api_error", "x") == []


def test_error_before_any_chunk_and_finish_with_no_chunk_are_well_formed():
    t = OpenAIStreamToAnthropic(model="m")
    assert [n for n, _ in events(t.error("api_error", "boom"))] == ["error"]
    out = OpenAIStreamToAnthropic(model="m", message_id="msg_fixed").finish()
    msg = validate_anthropic_stream(out)
    assert msg["id"] == "msg_fixed" and msg["content"] == [] and msg["stop_reason"] == "end_turn"


def test_cut_off_tool_arguments_end_in_error_unless_cut_at_max_tokens():
    cut = [chunk({"tool_calls": [tool_call(0, "c", "Write", '{"path": "a", "content": "hal')]})]
    out = run(cut)  # [DONE] without a finish_reason: the stream was cut
    assert validate_anthropic_stream(out)["error"] is not None
    msg = validate_anthropic_stream(run(cut + [chunk({}, "length")]))
    assert msg["stop_reason"] == "max_tokens" and msg["error"] is None


def test_interleaved_tool_calls_error_live_and_survive_buffered():
    chunks = [
        chunk({"tool_calls": [tool_call(0, "c0", "A", '{"x"')]}),
        chunk({"tool_calls": [tool_call(1, "c1", "B", '{"y": 2}')]}),
        chunk({"tool_calls": [tool_call(0, args=": 1}")]}),
        chunk({}, "tool_calls"),
    ]
    live = validate_anthropic_stream(run(chunks))
    assert live["error"]["type"] == "api_error"
    buffered = validate_anthropic_stream(run(chunks, buffer_tool_calls=True))
    assert [(b["name"], b["input"]) for b in buffered["content"]] == [("A", {"x": 1}), ("B", {"y": 2})]


def test_missing_tool_call_id_gets_one():
    msg = validate_anthropic_stream(run([chunk({"tool_calls": [{"index": 0, "function": {"name": "Ls", "arguments": "{}"}}]}, "tool_calls")]))
    assert msg["content"][0]["id"].startswith("toolu_")


# ------------------------------------------------------------ the validator is not a rubber stamp


def ev(name, **data):
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()


START = ev("message_start", message={"id": "m", "type": "message", "role": "assistant", "model": "x", "content": [], "usage": {"input_tokens": 1, "output_tokens": 0}})
END = ev("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 1}) + ev("message_stop")


@pytest.mark.parametrize(
    "stream",
    [
        ev("content_block_start", index=0, content_block={"type": "text", "text": ""}) + END,  # no message_start
        START + ev("content_block_start", index=1, content_block={"type": "text", "text": ""}),  # index gap
        START + ev("content_block_start", index=0, content_block={"type": "text", "text": ""}) + END,  # block left open
        START
        + ev("content_block_start", index=0, content_block={"type": "text", "text": ""})
        + ev("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": "{"}),  # wrong delta
        START
        + ev("content_block_start", index=0, content_block={"type": "tool_use", "id": "t", "name": "n", "input": {}})
        + ev("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": "{\"a"})
        + ev("content_block_stop", index=0)
        + END,  # broken tool JSON with end_turn
        START,  # never ends
        START + END + ev("ping"),  # anything after message_stop
        START + ev("message_stop"),  # message_stop without message_delta
        START + ev("surprise") + END,  # unknown event (unless allowed)
    ],
)
def test_validator_rejects_malformed_anthropic_streams(stream):
    with pytest.raises(MalformedStream):
        validate_anthropic_stream(stream)


@pytest.mark.parametrize(
    "stream",
    [
        b'data: {"id":"a","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\ndata: [DONE]\n\n',  # no role
        b'data: {"id":"a","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":"stop"}]}\n\n',  # no [DONE]
        b'data: {"id":"a","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[{"index":1,"id":"c","type":"function","function":{"name":"f"}}]},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',  # index skips 0
        b'data: {"error":{"message":"x"}}\n\ndata: {"id":"a","object":"chat.completion.chunk","choices":[]}\n\ndata: [DONE]\n\n',  # chunk after error
    ],
)
def test_validator_rejects_malformed_openai_streams(stream):
    with pytest.raises(MalformedStream):
        validate_openai_stream(stream)


# ------------------------------------------------------------ OpenAI → Anthropic, property

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
json_objects = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.none(), st.lists(st.integers(), max_size=3)),
    max_size=4,
)


@st.composite
def openai_streams(draw, *, interleave_tools: bool):
    """A random upstream: ops (reasoning, text, tool-call pieces) packed into chunks.

    With ``interleave_tools`` False, each tool call's pieces are contiguous and
    calls come in index order (every real server); text and reasoning runs
    fall anywhere. With it True, pieces of different calls interleave freely.
    """
    n_tools = draw(st.integers(0, 3))
    tools = []
    for k in range(n_tools):
        args = json.dumps(draw(json_objects))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(args) - 1)), max_size=4)))
        pieces = [args[a:b] for a, b in zip([0, *cuts], [*cuts, len(args)])]
        tool_ops = [("tool", k, f"call_{k}", f"fn_{k}", pieces[0])] + [("tool", k, None, None, p) for p in pieces[1:]]
        tools.append({"args": args, "ops": tool_ops})
    runs = [[(draw(st.sampled_from(["text", "reasoning"])), draw(texts))] for _ in range(draw(st.integers(0, 5)))]
    if interleave_tools:
        units = runs + [[op] for t in tools for op in t["ops"]]
    else:
        units = runs + [t["ops"] for t in tools]
    # Shuffle units, then restore each tool's own order (ids first, pieces in sequence).
    order = draw(st.permutations(range(len(units))))
    shuffled = [units[i] for i in order]
    tool_slots = [i for i, u in enumerate(shuffled) if u[0][0] == "tool"]
    tool_units_in_order = [u for u in units if u[0][0] == "tool"]
    for slot, unit in zip(tool_slots, tool_units_in_order):
        shuffled[slot] = unit
    ops = [op for u in shuffled for op in u]

    rank = {"reasoning": 0, "text": 1, "tool": 2}
    chunks, fed_ops, current = [], [], None
    if draw(st.booleans()):
        chunks.append(chunk({"role": "assistant", "content": ""}))
    for op in ops:
        merge = current is not None and draw(st.booleans())
        if merge:
            kinds = current["kinds"]
            # One delta holds one reasoning string and one content string,
            # applied in the order reasoning → content → tool calls.
            if rank[op[0]] < max(rank[k] for k in kinds) or (op[0] != "tool" and op[0] in kinds):
                merge = False
        if not merge:
            current = {"delta": {}, "kinds": []}
            chunks.append(chunk(current["delta"]))
        current["kinds"].append(op[0])
        if op[0] == "text":
            current["delta"]["content"] = op[1]
        elif op[0] == "reasoning":
            current["delta"]["reasoning_content"] = op[1]
        else:
            current["delta"].setdefault("tool_calls", []).append(tool_call(op[1], op[2], op[3], op[4]))
        fed_ops.append((len(chunks), op))
        if draw(st.integers(0, 9)) == 0:
            chunks.append(chunk({}))  # keep-alive: an empty delta
            current = None
    finish = draw(st.sampled_from([None, "stop", "length", "tool_calls", "content_filter"]))
    if finish:
        chunks.append(chunk({}, finish))
    if draw(st.booleans()):
        chunks.append(chunk(usage=USAGE, choices=False))
    cut = draw(st.integers(0, len(chunks))) if draw(st.integers(0, 3)) == 0 else len(chunks)
    end = draw(st.sampled_from(["finish", "finish", "finish", "error"]))
    return {"chunks": chunks[:cut], "ops": [op for n, op in fed_ops if n <= cut], "tools": tools, "end": end, "cut": cut < len(chunks)}


def _check_openai_to_anthropic(case, *, buffer_tool_calls: bool, sdk: bool):
    out = run(case["chunks"], end=case["end"], buffer_tool_calls=buffer_tool_calls)
    msg = validate_anthropic_stream(out)  # the grammar, always
    text = "".join(op[1] for op in case["ops"] if op[0] == "text")
    reasoning = "".join(op[1] for op in case["ops"] if op[0] == "reasoning")
    got_text = "".join(b["text"] for b in msg["content"] if b["type"] == "text")
    got_reasoning = "".join(b["thinking"] for b in msg["content"] if b["type"] == "thinking")
    calls = [b for b in msg["content"] if b["type"] == "tool_use"]
    if msg["error"] is not None:
        # An error ends the stream where it stood: what was sent is a prefix.
        assert text.startswith(got_text) and reasoning.startswith(got_reasoning)
        return msg
    assert got_text == text and got_reasoning == reasoning
    fed_args: dict[int, str] = {}
    for op in case["ops"]:
        if op[0] == "tool":
            fed_args[op[1]] = fed_args.get(op[1], "") + op[4]
    assert [b["id"] for b in calls] == [f"call_{k}" for k in sorted(fed_args)]
    assert [b["name"] for b in calls] == [f"fn_{k}" for k in sorted(fed_args)]
    for block, k in zip(calls, sorted(fed_args)):
        if fed_args[k] == case["tools"][k]["args"]:
            assert block["input"] == json.loads(case["tools"][k]["args"])
        else:  # cut inside the arguments: only legal at max_tokens
            assert msg["stop_reason"] == "max_tokens"
    finish = next((c["choices"][0]["finish_reason"] for c in case["chunks"] if c["choices"] and c["choices"][0]["finish_reason"]), None)
    if calls and finish in (None, "stop", "tool_calls"):
        assert msg["stop_reason"] == "tool_use"
    else:
        assert msg["stop_reason"] == {None: "end_turn", "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}[finish]
    if sdk:
        snapshot = sdk_message(out)
        assert [b.type for b in snapshot.content] == [b["type"] for b in msg["content"]]
        assert snapshot.stop_reason == msg["stop_reason"]
    return msg


@PROPERTY
@given(openai_streams(interleave_tools=False))
def test_property_sequential_upstream_streams_translate_losslessly(case):
    _check_openai_to_anthropic(case, buffer_tool_calls=False, sdk=True)


@PROPERTY
@given(openai_streams(interleave_tools=True), st.booleans())
def test_property_interleaved_upstream_streams_stay_well_formed(case, buffer_tool_calls):
    msg = _check_openai_to_anthropic(case, buffer_tool_calls=buffer_tool_calls, sdk=False)
    if buffer_tool_calls and case["end"] == "finish" and not case["cut"]:
        assert msg["error"] is None  # buffering is lossless for any interleaving


# ------------------------------------------------------------ Anthropic → OpenAI


def anthropic_events(blocks, stop_reason="end_turn", usage=None):
    evs = [("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [], "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}}}), ("ping", {"type": "ping"})]
    for i, (kind, pieces, *tool) in enumerate(blocks):
        if kind == "text":
            start = {"type": "text", "text": ""}
        elif kind == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            start = {"type": "tool_use", "id": tool[0], "name": tool[1], "input": {}}
        evs.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
        for p in pieces:
            delta = {"text": {"type": "text_delta", "text": p}, "thinking": {"type": "thinking_delta", "thinking": p}, "tool_use": {"type": "input_json_delta", "partial_json": p}}[kind]
            evs.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}))
        if kind == "thinking":
            evs.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {"type": "signature_delta", "signature": "sig"}}))
        evs.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    evs.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": usage or {"output_tokens": 42}}))
    evs.append(("message_stop", {"type": "message_stop"}))
    return evs


def translate_back(evs, *, finish=True, **kw):
    t = AnthropicStreamToOpenAI(created=1700000000, **kw)
    out = []
    for name, data in evs:
        out += t.feed(name, data)
    if finish:
        out += t.finish()
    return out


def test_claude_stream_to_openai_chunks_the_openai_sdk_accepts():
    evs = anthropic_events(
        [("thinking", ["Plan: ", "read it."]), ("text", ["Reading ", "now."]), ("tool_use", ['{"path"', ': "a.py"}'], "toolu_1", "Read"), ("tool_use", ["{}"], "toolu_2", "Ls")],
        stop_reason="tool_use",
    )
    out = translate_back(evs, include_usage=True)
    got = validate_openai_stream(out)
    assert got["content"] == "Reading now." and got["reasoning_content"] == "Plan: read it."
    assert got["tool_calls"] == [{"id": "toolu_1", "name": "Read", "arguments": '{"path": "a.py"}'}, {"id": "toolu_2", "name": "Ls", "arguments": "{}"}]
    assert got["finish_reason"] == "tool_calls" and got["id"] == "chatcmpl-msg_1"
    assert got["usage"] == {"prompt_tokens": 15, "completion_tokens": 42, "total_tokens": 57, "prompt_tokens_details": {"cached_tokens": 5}}
    assert out[-1] == b"data: [DONE]\n\n"
    state = ChatCompletionStreamState()
    for e in SSEParser().feed(b"".join(out)):
        if e.data != b"[DONE]":
            state.handle_chunk(ChatCompletionChunk.model_validate_json(e.data))
    final = state.get_final_completion()
    assert final.choices[0].message.content == "Reading now."
    calls = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [("toolu_1", "Read", {"path": "a.py"}), ("toolu_2", "Ls", {})]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage.total_tokens == 57


def test_no_usage_chunk_unless_asked():
    got = validate_openai_stream(translate_back(anthropic_events([("text", ["hi"])])))
    assert got["usage"] is None and got["finish_reason"] == "stop"


@pytest.mark.parametrize(("stop", "finish"), [("max_tokens", "length"), ("refusal", "content_filter"), ("stop_sequence", "stop"), ("pause_turn", "stop")])
def test_stop_reasons_map_back(stop, finish):
    assert validate_openai_stream(translate_back(anthropic_events([("text", ["x"])], stop_reason=stop)))["finish_reason"] == finish


def test_anthropic_error_event_becomes_error_line_then_done():
    evs = anthropic_events([("text", ["partial"])])[:4] + [("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]
    out = translate_back(evs)
    assert out[-1] == b"data: [DONE]\n\n"
    assert json.loads(out[-2][6:]) == {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}
    got = validate_openai_stream(out)
    assert got["content"] == "partial" and got["error"]["type"] == "overloaded_error"


def test_upstream_cut_before_message_stop_is_an_error_not_a_clean_end():
    out = translate_back(anthropic_events([("text", ["half"])])[:5])
    assert validate_openai_stream(out)["error"]["message"] == "the upstream stream ended before message_stop"


@st.composite
def anthropic_streams(draw):
    blocks = []
    for k in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "thinking", "tool_use"]))
        if kind == "tool_use":
            args = json.dumps(draw(json_objects))
            cuts = sorted(draw(st.sets(st.integers(1, max(1, len(args) - 1)), max_size=3)))
            blocks.append((kind, [args[a:b] for a, b in zip([0, *cuts], [*cuts, len(args)])], f"toolu_{k}", f"fn_{k}"))
        else:
            blocks.append((kind, draw(st.lists(texts, max_size=4))))
    stop = draw(st.sampled_from(["end_turn", "max_tokens", "tool_use", "stop_sequence", "refusal"]))
    evs = anthropic_events(blocks, stop_reason=stop)
    cut = draw(st.integers(0, len(evs))) if draw(st.booleans()) else len(evs)
    error = draw(st.booleans()) and cut < len(evs)
    evs = evs[:cut] + ([("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})] if error else [])
    return {"blocks": blocks, "events": evs, "complete": cut == len(anthropic_events(blocks, stop)), "stop": stop}


@PROPERTY
@given(anthropic_streams(), st.booleans())
def test_property_anthropic_streams_become_well_formed_openai_streams(case, include_usage):
    out = translate_back(case["events"], include_usage=include_usage)
    got = validate_openai_stream(out)  # ends in [DONE], grammar holds
    text = "".join(p for b in case["blocks"] if b[0] == "text" for p in b[1])
    reasoning = "".join(p for b in case["blocks"] if b[0] == "thinking" for p in b[1])
    tools = [(b[2], b[3], "".join(b[1])) for b in case["blocks"] if b[0] == "tool_use"]
    if case["complete"]:
        assert got["error"] is None
        assert got["content"] == text and got["reasoning_content"] == reasoning
        assert [(c["id"], c["name"], c["arguments"]) for c in got["tool_calls"]] == tools
        assert got["finish_reason"] == {"end_turn": "stop", "max_tokens": "length", "tool_use": "tool_calls", "stop_sequence": "stop", "refusal": "content_filter"}[case["stop"]]
        assert (got["usage"] is not None) == include_usage
    else:
        assert got["error"] is not None
        assert text.startswith(got["content"]) and reasoning.startswith(got["reasoning_content"])
