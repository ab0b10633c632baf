"""The request-kind classifier: each of Claude Code's side calls, near misses, hostile shapes."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtests.payload import claude_code_body
from proxy.ingress.anthropic import decode_messages
from proxy.kinds import KINDS, classify
from tests import side_calls
from tests.harness import claude_code_body as fixture_body


def kind_of(doc: dict) -> str:
    return classify(decode_messages(side_calls.encode(doc)))


@pytest.mark.parametrize("kind", sorted(side_calls.ALL))
def test_each_side_call_is_named(kind: str) -> None:
    assert kind_of(side_calls.ALL[kind]()) == kind


def test_title_v2_with_a_system_item_inside_messages() -> None:
    assert kind_of(side_calls.title_v2()) == "title"


def test_main_conversations_stay_main() -> None:
    assert classify(decode_messages(claude_code_body(stream=True))) == "main"
    assert classify(decode_messages(fixture_body())) == "main"


def test_a_long_conversation_ending_in_a_suggestion_prompt() -> None:
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "turn %d " % i * 50} for i in range(40)]
    assert kind_of(side_calls.suggestion(history)) == "suggestion"


@pytest.mark.parametrize("where", ["first", "last"])
def test_suggestion_prompt_beside_a_huge_block_is_found_at_either_end(where: str) -> None:
    doc = side_calls.suggestion()
    prompt = doc["messages"][-1]["content"]
    huge = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x" * 500_000}]
    doc["messages"][-1]["content"] = prompt + huge if where == "first" else huge + prompt
    assert kind_of(doc) == "suggestion"


def test_suggestion_marker_buried_mid_message_is_not_looked_for() -> None:
    doc = side_calls.suggestion()
    pad = {"type": "text", "text": "y" * 10_000}
    doc["messages"][-1]["content"] = [pad, *doc["messages"][-1]["content"], pad]
    assert kind_of(doc) == "main"


def test_suggestion_marker_earlier_in_the_history_is_not_a_suggestion() -> None:
    doc = side_calls.suggestion()
    doc["messages"].append({"role": "assistant", "content": "run the tests"})
    doc["messages"].append({"role": "user", "content": "ok, run them"})
    assert kind_of(doc) == "main"


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(max_tokens=2),  # a real one-word answer is not a probe
        lambda d: d["messages"].append({"role": "assistant", "content": "quota"}),
        lambda d: d.update(messages=[{"role": "assistant", "content": "quota"}]),
        lambda d: d.update(messages=[{"role": "user", "content": "hello"}]),
    ],
)
def test_quota_probe_near_misses(change) -> None:  # type: ignore[no-untyped-def]
    doc = side_calls.quota_probe()
    change(doc)
    assert kind_of(doc) == "main"


def test_quota_probe_any_case_and_block_content() -> None:
    doc = side_calls.quota_probe()
    doc["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Check QUOTA"}]}]
    assert kind_of(doc) == "quota_probe"


@pytest.mark.parametrize("kind", ["title", "bash_prefix", "filepath"])
def test_single_turn_side_calls_with_tools_are_main(kind: str) -> None:
    doc = side_calls.ALL[kind]()
    doc["tools"] = [{"name": "Read", "input_schema": {"type": "object"}}]
    assert kind_of(doc) == "main"


@pytest.mark.parametrize("kind", ["title", "bash_prefix", "filepath"])
def test_single_turn_side_calls_with_empty_or_null_tools_keep_their_kind(kind: str) -> None:
    for tools in ([], None):
        doc = side_calls.ALL[kind]()
        doc["tools"] = tools
        assert kind_of(doc) == kind


@pytest.mark.parametrize("kind", ["title", "bash_prefix", "filepath"])
def test_single_turn_side_calls_in_a_conversation_are_main(kind: str) -> None:
    doc = side_calls.ALL[kind]()
    doc["messages"] = doc["messages"] + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    assert kind_of(doc) == "main"


def test_a_user_asking_about_a_command_is_not_a_filepath_call() -> None:
    doc = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "Command: ls\nOutput: a.py\nwhat is this?"}]}
    assert kind_of(doc) == "main"
    doc["system"] = "You are a helpful assistant."
    assert kind_of(doc) == "main"


def test_a_title_in_a_normal_system_prompt_is_main() -> None:
    doc = {"model": "m", "max_tokens": 100, "system": "Write a title for my blog post.", "messages": [{"role": "user", "content": "about trio"}]}
    assert kind_of(doc) == "main"


def test_odd_roles_are_not_user_turns() -> None:
    doc = side_calls.quota_probe()
    for role in (1, None, ["user"], {"user": 1}, "USER"):
        doc["messages"] = [{"role": role, "content": "quota"}]
        assert kind_of(doc) == "main"
    doc["messages"] = [{"content": "quota"}]
    assert kind_of(doc) == "main"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.sampled_from(["quota", "user", "system", "[SUGGESTION MODE:", "<policy_spec>", "Command:"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["role", "content", "type", "text"]), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(
    max_tokens=st.sampled_from([1, 2, 512]),
    messages=st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]), _json, max_size=3), min_size=1, max_size=5),
    system=_json,
    tools=_json,
)
def test_any_decodable_body_gets_a_kind(max_tokens: int, messages: list, system: object, tools: object) -> None:
    """Whatever the envelope accepts, the classifier names — it never raises."""
    doc = {"model": "m", "max_tokens": max_tokens, "messages": copy.deepcopy(messages), "system": system, "tools": tools}
    assert kind_of(doc) in KINDS
