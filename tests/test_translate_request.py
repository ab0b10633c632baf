"""Requests and whole responses across the translation boundary.

A client sends X in its API; the upstream must see Y in the other. Table
tests pin the shapes that matter (Claude Code's real request first);
Hypothesis round trips check that nothing of meaning is lost going there
and back.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.translate import (
    DEFAULT_MAX_TOKENS,
    TranslationError,
    anthropic_request_to_openai,
    anthropic_response_to_openai,
    openai_request_to_anthropic,
    openai_response_to_anthropic,
)

EXAMPLES = int(os.environ.get("WEIR_HYPOTHESIS_EXAMPLES", "200"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CC = {"type": "ephemeral"}
TOOL_NAMES = ["Task", "Bash", "Glob", "Grep", "LS", "Read", "Edit", "MultiEdit", "Write", "NotebookEdit", "WebFetch", "TodoWrite"]


def schema(name):
    return {
        "type": "object",
        "properties": {"arg": {"type": "string", "description": f"{name}'s argument"}},
        "required": ["arg"],
        "additionalProperties": False,
        "$schema": "http://json-schema.org/draft-07/schema#",
    }


def claude_code_request():
    """The shape Claude Code sends (trimmed text, real structure)."""
    tools = [{"name": n, "description": f"The {n} tool.", "input_schema": schema(n)} for n in TOOL_NAMES]
    tools[-1]["cache_control"] = CC
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "stream": True,
        "temperature": 1,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": CC},
            {"type": "text", "text": "You are an interactive CLI tool...", "cache_control": CC},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                    {"type": "text", "text": "What is in a.png and in src/?", "cache_control": CC},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "List first.", "signature": "EqQBCkYIBxgCKkC..."},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_01", "name": "LS", "input": {"arg": "src"}},
                    {"type": "tool_use", "id": "toolu_02", "name": "Read", "input": {"arg": "shot.png"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.py\nb.py"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_02",
                        "content": [
                            {"type": "text", "text": "an image:"},
                            {"type": "image", "source": {"type": "url", "url": "https://example.com/shot.png"}},
                        ],
                        "is_error": False,
                    },
                    {"type": "text", "text": "Thanks.", "cache_control": CC},
                ],
            },
        ],
        "tools": tools,
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "metadata": {"user_id": "user_abc_account_123_session_456"},
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
    }


def test_claude_code_request_becomes_this_chat_completions_request():
    out = anthropic_request_to_openai(claude_code_request(), model="meta/llama-3.3-70b-instruct").body
    assert out["model"] == "meta/llama-3.3-70b-instruct"
    assert out["messages"] == [
        {"role": "system", "content": "You are Claude Code, Anthropic's official CLI for Claude.\n\nYou are an interactive CLI tool..."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "What is in a.png and in src/?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "toolu_01", "type": "function", "function": {"name": "LS", "arguments": '{"arg":"src"}'}},
                {"id": "toolu_02", "type": "function", "function": {"name": "Read", "arguments": '{"arg":"shot.png"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_01", "content": "a.py\nb.py"},
        {"role": "tool", "tool_call_id": "toolu_02", "content": "an image:"},
        # The tool's image follows the tool messages, in a user turn of its own.
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/shot.png"}}, {"type": "text", "text": "Thanks."}],
        },
    ]
    assert len(out["tools"]) == 12
    assert out["tools"][1] == {"type": "function", "function": {"name": "Bash", "description": "The Bash tool.", "parameters": schema("Bash")}}
    assert out["tool_choice"] == "auto" and "parallel_tool_calls" not in out
    assert out["max_tokens"] == 32000 and "max_completion_tokens" not in out
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert out["reasoning_effort"] == "high" and out["user"] == "user_abc_account_123_session_456"
    assert out["temperature"] == 1
    # Nothing Anthropic-only leaks through (an OpenAI server would 400 on it).
    assert not {"system", "thinking", "metadata", "context_management", "top_k"} & out.keys()
    assert "cache_control" not in json.dumps(out)


def claude_code_2_request():
    """Claude Code 2.1.x: a system item after the first user turn, adaptive
    thinking, output_config, context_management, a server tool."""
    req = claude_code_request()
    req["model"], req["max_tokens"] = "claude-opus-5-5", 128000
    req["thinking"] = {"type": "adaptive", "display": "omitted"}
    req["output_config"] = {"effort": "medium"}
    req["context_management"] = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    req["messages"].insert(1, {"role": "system", "content": [{"type": "text", "text": "# Environment\nplatform: linux"}]})
    req["tools"].append({"type": "web_search_20250305", "name": "web_search", "max_uses": 5})
    return req


def test_claude_code_2_request_system_item_effort_and_dropped_fields():
    out = anthropic_request_to_openai(claude_code_2_request(), model="deepseek-ai/deepseek-r1")
    roles = [m["role"] for m in out.body["messages"]]
    # The system item stays where it was: after the first user turn.
    assert roles[:3] == ["system", "user", "system"]
    assert out.body["messages"][2] == {"role": "system", "content": "# Environment\nplatform: linux"}
    assert out.body["reasoning_effort"] == "medium" and out.body["max_tokens"] == 128000
    assert out.dropped == ("tools.web_search_20250305", "context_management")
    assert len(out.body["tools"]) == 12 and "web_search" not in out.tool_names and "Read" in out.tool_names
    assert out.omit_thinking is True
    assert not {"thinking", "output_config", "context_management"} & out.body.keys()


@pytest.mark.parametrize(
    ("thinking", "config", "effort"),
    [
        ({"type": "adaptive"}, None, "high"),  # Anthropic's default effort
        ({"type": "adaptive"}, {"effort": "low"}, "low"),
        ({"type": "adaptive", "display": "omitted"}, {"effort": "max"}, "high"),  # no "max" in OpenAI's words
        ({"type": "adaptive"}, {"effort": "xhigh"}, "high"),
        (None, {"effort": "medium"}, "medium"),
        ({"type": "enabled", "budget_tokens": 2048}, {"effort": "high"}, "low"),  # a budget keeps its mapping
        ({"type": "disabled"}, None, None),
        (None, None, None),
    ],
)
def test_adaptive_thinking_and_effort_to_reasoning_effort(thinking, config, effort):
    req = {"model": "m", "max_tokens": 64000, "messages": [{"role": "user", "content": "hi"}]}
    if thinking is not None:
        req["thinking"] = thinking
    if config is not None:
        req["output_config"] = config
    out = anthropic_request_to_openai(req)
    assert out.body.get("reasoning_effort") == effort
    assert out.dropped == ()


def test_system_items_clear_at_and_per_turn_effort():
    req = {
        "model": "m",
        "max_tokens": 100,
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "low"},
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "system", "content": "only for turn one", "clear_at": "next_user_message"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "two"},
            {"role": "system", "content": [{"type": "text", "text": "still shown"}], "clear_at": "next_user_message", "output_config": {"effort": "high"}},
            {"role": "system", "content": "", "output_config": {}},
        ],
    }
    out = anthropic_request_to_openai(req)
    assert out.body["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "two"},
        {"role": "system", "content": "still shown"},
    ]
    assert out.body["reasoning_effort"] == "high"  # the newest effort wins
    assert out.dropped == ()


def test_structured_output_becomes_response_format():
    schema_ = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    base = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    for req in ({**base, "output_config": {"format": {"type": "json_schema", "schema": schema_}}}, {**base, "output_format": {"type": "json_schema", "schema": schema_}}):
        out = anthropic_request_to_openai(req)
        assert out.body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema_, "strict": True}}
        assert out.dropped == ()
    out = anthropic_request_to_openai({**base, "output_config": {"format": {"type": "xml"}}})
    assert "response_format" not in out.body and out.dropped == ("output_config.format",)


def test_every_field_without_openai_meaning_is_reported_once():
    req = {
        "model": "m",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "x"}, {"type": "tool_addition", "name": "T"}], "output_config": {"effort": "low", "verbosity": 1}},
        ],
        "tools": [
            {"name": "A", "input_schema": {"type": "object"}, "defer_loading": True, "strict": True},
            {"name": "B", "input_schema": {"type": "object"}, "defer_loading": True},
            {"type": "code_execution_20250825", "name": "code_execution"},
        ],
        "metadata": {"user_id": "u", "session": "s"},
        "output_config": {"effort": "low", "task_budget": 5},
        "thinking": {"type": "adaptive", "interleave": True},
        "top_k": 5,
        "service_tier": "auto",
        "container": "c",
        "mcp_servers": [],
        "speed": "fast",
        "cache_control": {"type": "ephemeral"},  # left to the server's prefix caching: not reported
        "future_field": {},
    }
    out = anthropic_request_to_openai(req)
    assert sorted(out.dropped) == sorted(
        [
            "messages.system.tool_addition", "messages.system.output_config.verbosity", "tools.defer_loading",
            "tools.code_execution_20250825", "metadata.session", "output_config.task_budget", "thinking.interleave",
            "top_k", "service_tier", "container", "mcp_servers", "speed", "future_field",
        ]
    )  # fmt: skip
    assert out.body["tools"][0]["function"]["strict"] is True and "strict" not in out.body["tools"][1]["function"]
    assert out.body["user"] == "u"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "tool", "name": "Bash"}, {"tool_choice": {"type": "function", "function": {"name": "Bash"}}}),
        ({"type": "any", "disable_parallel_tool_use": True}, {"tool_choice": "required", "parallel_tool_calls": False}),
    ],
)
def test_tool_choice_to_openai(choice, expected):
    req = {"model": "m", "max_tokens": 5, "messages": [], "tools": [{"name": "Bash", "input_schema": schema("Bash")}], "tool_choice": choice}
    out = anthropic_request_to_openai(req).body
    assert {k: out[k] for k in ("tool_choice", "parallel_tool_calls") if k in out} == expected


@pytest.mark.parametrize(("budget", "effort"), [(1024, "low"), (4000, "low"), (10000, "medium"), (16384, "medium"), (31999, "high")])
def test_thinking_budget_to_reasoning_effort(budget, effort):
    req = {"model": "m", "max_tokens": 64000, "messages": [], "thinking": {"type": "enabled", "budget_tokens": budget}}
    assert anthropic_request_to_openai(req).body["reasoning_effort"] == effort


def test_disabled_thinking_stop_sequences_and_server_tools():
    req = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
        "thinking": {"type": "disabled"},
        "stop_sequences": ["END"],
        "top_k": 5,
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "tool_choice": {"type": "auto"},
    }
    out = anthropic_request_to_openai(req)
    assert out.dropped == ("tools.web_search_20250305", "top_k")
    assert out.body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stop": ["END"]}


@pytest.mark.parametrize(
    "req",
    [
        {"messages": "hi"},
        {"messages": [{"role": "developer", "content": "x"}]},
        {"messages": [{"role": "system", "content": 5}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "mystery"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
        {"messages": [], "system": [{"type": "image"}]},
        "not an object",
    ],
)
def test_impossible_anthropic_requests_raise_translation_error(req):
    with pytest.raises(TranslationError):
        anthropic_request_to_openai(req)


# ------------------------------------------------------------ whole responses


def test_openai_response_to_anthropic_message():
    resp = {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "reasoning_content": "Check the dir.",
                    "content": "Looking.",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "LS", "arguments": '{"arg": "."}'}},
                        {"id": "call_2", "type": "function", "function": {"name": "Glob", "arguments": ""}},
                        {"id": "call_3", "type": "function", "function": {"name": "Grep", "arguments": '"{\\"arg\\": \\"x\\"}"'}},
                        {"id": "call_4", "type": "function", "function": {"name": "Bash", "arguments": "{oops"}},
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57, "prompt_tokens_details": {"cached_tokens": 32}},
    }
    msg = openai_response_to_anthropic(resp, model="claude-sonnet-4-5")
    assert msg == {
        "id": "msg_chatcmpl-9",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "Check the dir.", "signature": ""},
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "call_1", "name": "LS", "input": {"arg": "."}},
            {"type": "tool_use", "id": "call_2", "name": "Glob", "input": {}},  # "" = no parameters
            {"type": "tool_use", "id": "call_3", "name": "Grep", "input": {"arg": "x"}},  # encoded twice
            {"type": "tool_use", "id": "call_4", "name": "Bash", "input": {"_raw_arguments": "{oops"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 18, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 32},
    }


def test_think_and_tool_call_tags_in_content_become_blocks():
    content = '<think>\nRead it first.\n</think>\n\nReading.\n<tool_call>\n{"name": "Read", "arguments": {"arg": "a.py"}}\n</tool_call>'
    resp = {"id": "c1", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
    msg = openai_response_to_anthropic(resp, model="m", tool_names=frozenset({"Read"}))
    assert msg["content"] == [
        {"type": "thinking", "thinking": "Read it first.", "signature": ""},
        {"type": "text", "text": "Reading."},
        {"type": "tool_use", "id": "toolu_c1_t2", "name": "Read", "input": {"arg": "a.py"}},
    ]
    assert msg["stop_reason"] == "tool_use"  # the server said "stop"; a tool call was made
    # display: "omitted" — no thinking, whichever way the model sent it.
    resp["choices"][0]["message"]["reasoning_content"] = "more"
    msg = openai_response_to_anthropic(resp, model="m", tool_names=frozenset({"Read"}), omit_thinking=True)
    assert [b["type"] for b in msg["content"]] == ["text", "tool_use"]
    # Without the tool declared, the tag is text.
    msg = openai_response_to_anthropic(resp, model="m", omit_thinking=True)
    assert [b["type"] for b in msg["content"]] == ["text"] and msg["stop_reason"] == "end_turn"


@pytest.mark.parametrize(
    ("choice", "stop_reason", "stop_sequence"),
    [
        ({"finish_reason": "stop"}, "end_turn", None),
        ({"finish_reason": "length"}, "max_tokens", None),
        ({"finish_reason": "content_filter"}, "refusal", None),
        ({"finish_reason": "stop", "stop_reason": "###"}, "stop_sequence", "###"),
    ],
)
def test_openai_finish_reason_to_stop_reason(choice, stop_reason, stop_sequence):
    resp = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, **choice}]}
    msg = openai_response_to_anthropic(resp, model="m")
    assert (msg["stop_reason"], msg["stop_sequence"]) == (stop_reason, stop_sequence)


def test_anthropic_response_to_openai_completion():
    msg = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Here."},
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"arg": "a"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 2},
    }
    out = anthropic_response_to_openai(msg, created=1700000000)
    assert out == {
        "id": "chatcmpl-msg_1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "claude-x",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Here.",
                    "reasoning_content": "hmm",
                    "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "Read", "arguments": '{"arg":"a"}'}}],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19, "prompt_tokens_details": {"cached_tokens": 10}},
    }


# ------------------------------------------------------------ OpenAI client → Anthropic upstream


def test_openai_request_to_anthropic_request():
    req = {
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/x.png", "detail": "high"}},
                ],
            },
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ]},  # fmt: skip
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": "and?"},
            {"role": "user", "content": "well?"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "description": "F.", "parameters": {"type": "object"}, "strict": True}}, {"type": "function", "function": {"name": "g"}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_completion_tokens": 1000,
        "max_tokens": 50,
        "stop": "###",
        "temperature": 1.5,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
        "seed": 7,
    }
    out = openai_request_to_anthropic(req)
    assert out == {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.\n\nUse tools.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                    {"type": "tool_use", "id": "call_2", "name": "g", "input": {}},
                ],
            },
            {
                "role": "user",  # two tool messages and two user messages: one alternating turn
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "two"},
                    {"type": "text", "text": "and?"},
                    {"type": "text", "text": "well?"},
                ],
            },
        ],
        "max_tokens": 1000,  # max_completion_tokens wins over the deprecated max_tokens
        "temperature": 1.0,  # clamped to Anthropic's range
        "top_p": 0.9,
        "stop_sequences": ["###"],
        "stream": True,
        "tools": [{"name": "f", "description": "F.", "input_schema": {"type": "object"}}, {"name": "g", "input_schema": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-1"},
    }


def test_max_tokens_default_and_reasoning_effort():
    out = openai_request_to_anthropic({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2})
    assert out["max_tokens"] == DEFAULT_MAX_TOKENS == 4096 and "thinking" not in out and out["temperature"] == 0.2
    out = openai_request_to_anthropic({"model": "m", "messages": [], "reasoning_effort": "medium", "max_tokens": 64000, "temperature": 0.2})
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 16384} and "temperature" not in out
    # The budget must stay under max_tokens: shrink it, never raise the client's cap.
    out = openai_request_to_anthropic({"model": "m", "messages": [], "reasoning_effort": "high", "max_tokens": 8000})
    assert out["thinking"]["budget_tokens"] == 7999 and out["max_tokens"] == 8000
    out = openai_request_to_anthropic({"model": "m", "messages": [], "reasoning_effort": "high", "max_tokens": 500})
    assert "thinking" not in out  # below Anthropic's 1024 minimum


@pytest.mark.parametrize(
    "req",
    [
        {"messages": {"role": "user"}},
        {"messages": [], "n": 2},
        {"messages": [{"role": "function", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
    ],
)
def test_impossible_openai_requests_raise_translation_error(req):
    with pytest.raises(TranslationError):
        openai_request_to_anthropic(req)


# ------------------------------------------------------------ round trips

words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)
b64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", min_size=4, max_size=16)
json_inputs = st.dictionaries(st.text(min_size=1, max_size=5), st.one_of(st.integers(), st.text(max_size=8), st.booleans()), max_size=3)
tool_names = st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), min_size=1, max_size=4, unique=True)


@st.composite
def openai_requests(draw):
    names = draw(tool_names)
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(words)})
    ids = iter(range(1000))
    for _ in range(draw(st.integers(1, 4))):
        parts = draw(st.lists(st.one_of(
            words.map(lambda t: {"type": "text", "text": t}),
            b64.map(lambda d: {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{d}"}}),
            st.just({"type": "image_url", "image_url": {"url": "https://example.com/i.png"}}),
        ), min_size=1, max_size=3))  # fmt: skip
        messages.append({"role": "user", "content": draw(st.one_of(words, st.just(parts)))})
        calls = [
            {"id": f"call_{next(ids)}", "type": "function", "function": {"name": draw(st.sampled_from(names)), "arguments": json.dumps(draw(json_inputs))}}
            for _ in range(draw(st.integers(0, 3)))
        ]
        text = draw(st.one_of(st.none(), words))
        if text is None and not calls:
            text = draw(words)
        assistant = {"role": "assistant", "content": text}
        if calls:
            assistant["tool_calls"] = calls
        messages.append(assistant)
        for call in calls:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": draw(st.text(max_size=10))})
    req = {
        "model": "m",
        "messages": messages,
        "max_tokens": draw(st.integers(1, 100000)),
        "tools": [{"type": "function", "function": {"name": n, "description": draw(words), "parameters": {"type": "object", "properties": {}}}} for n in names],
        "tool_choice": draw(st.sampled_from(["auto", "required", "none", {"type": "function", "function": {"name": names[0]}}])),
    }
    if draw(st.booleans()):
        req["parallel_tool_calls"] = False
    for key, strategy in (("temperature", st.floats(0, 1)), ("top_p", st.floats(0, 1)), ("stop", st.lists(words, min_size=1, max_size=3)), ("stream", st.just(True))):
        if draw(st.booleans()):
            req[key] = draw(strategy)
    return req


def openai_items(messages):
    """The meaning of an OpenAI conversation as a flat list: roles, texts, images, calls, results."""
    items = []
    for m in messages:
        if m["role"] == "tool":
            items.append(("tool", m["tool_call_id"], m["content"]))
            continue
        content = m.get("content")
        parts = [] if content is None else [{"type": "text", "text": content}] if isinstance(content, str) else content
        for p in parts:
            items.append((m["role"], p["type"], p["text"] if p["type"] == "text" else p["image_url"]["url"]))
        for call in m.get("tool_calls") or ():
            items.append(("call", call["id"], call["function"]["name"], json.loads(call["function"]["arguments"])))
    return items


@PROPERTY
@given(openai_requests())
def test_property_openai_request_survives_a_trip_through_anthropic(req):
    there = openai_request_to_anthropic(req)
    roles = [m["role"] for m in there["messages"]]
    assert all(a != b for a, b in zip(roles, roles[1:])), "Anthropic needs alternating turns"
    back = anthropic_request_to_openai(there).body
    assert openai_items(back["messages"]) == openai_items(req["messages"])
    assert back["tools"] == req["tools"]
    assert back["tool_choice"] == req["tool_choice"]
    assert back.get("parallel_tool_calls", True) == req.get("parallel_tool_calls", True) or req["tool_choice"] == "none"
    for key in ("max_tokens", "temperature", "top_p", "stop", "stream"):
        assert back.get(key) == req.get(key), key


@st.composite
def anthropic_requests(draw):
    names = draw(tool_names)
    messages, pending, ids = [], [], iter(range(1000))
    for _ in range(draw(st.integers(1, 4))):
        blocks = [{"type": "tool_result", "tool_use_id": i, "content": draw(st.text(max_size=10))} for i in pending]
        blocks += draw(st.lists(st.one_of(
            words.map(lambda t: {"type": "text", "text": t}),
            b64.map(lambda d: {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": d}}),
            st.just({"type": "image", "source": {"type": "url", "url": "https://example.com/i.png"}}),
        ), min_size=0 if pending else 1, max_size=3))  # fmt: skip
        plain = len(blocks) == 1 and blocks[0]["type"] == "text" and draw(st.booleans())
        messages.append({"role": "user", "content": blocks[0]["text"] if plain else blocks})
        content = [{"type": "text", "text": draw(words)}] if draw(st.booleans()) else []
        pending = [f"toolu_{next(ids)}" for _ in range(draw(st.integers(0 if content else 1, 3)))]
        content += [{"type": "tool_use", "id": i, "name": draw(st.sampled_from(names)), "input": draw(json_inputs)} for i in pending]
        messages.append({"role": "assistant", "content": content})
    req = {
        "model": "m",
        "max_tokens": draw(st.integers(1, 100000)),
        "messages": messages,
        "tools": [{"name": n, "description": draw(words), "input_schema": {"type": "object", "properties": {}}} for n in names],
        "tool_choice": draw(st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}, {"type": "tool", "name": names[0]}])),
    }
    if req["tool_choice"]["type"] != "none" and draw(st.booleans()):
        req["tool_choice"]["disable_parallel_tool_use"] = True
    if draw(st.booleans()):
        req["system"] = draw(words)
    for key, strategy in (("temperature", st.floats(0, 1)), ("top_p", st.floats(0, 1)), ("stop_sequences", st.lists(words, min_size=1, max_size=3)), ("stream", st.just(True))):
        if draw(st.booleans()):
            req[key] = draw(strategy)
    return req


def anthropic_items(messages):
    items = []
    for m in messages:
        blocks = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for b in blocks:
            if b["type"] == "text":
                items.append((m["role"], "text", b["text"]))
            elif b["type"] == "image":
                items.append((m["role"], "image", b["source"]))
            elif b["type"] == "tool_use":
                items.append(("tool_use", b["id"], b["name"], b["input"]))
            else:
                items.append(("tool_result", b["tool_use_id"], b["content"]))
    return items


@PROPERTY
@given(anthropic_requests())
def test_property_anthropic_request_survives_a_trip_through_openai(req):
    back = openai_request_to_anthropic(anthropic_request_to_openai(req).body)
    assert anthropic_items(back["messages"]) == anthropic_items(req["messages"])
    assert back.get("system") == req.get("system")
    assert back["tools"] == req["tools"] and back["tool_choice"] == req["tool_choice"]
    for key in ("max_tokens", "temperature", "top_p", "stop_sequences", "stream"):
        assert back.get(key) == req.get(key), key
