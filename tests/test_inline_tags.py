"""<think> and <tool_call> written into a model's text, whole and streamed.

A model on an OpenAI-compatible server writes its reasoning and tool calls
as tags in ``content``; the parser must give the same segments however the
text is cut into deltas — a tag split at any character included.
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.translate import InlineTagParser

EXAMPLES = int(os.environ.get("WEIR_HYPOTHESIS_EXAMPLES", "200"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOOLS = frozenset({"Read", "Bash"})


def parse(chunks, tools=TOOLS):
    """Segments, adjacent text (or thinking) pieces joined: what a client assembles."""
    p = InlineTagParser(tools)
    raw = [seg for c in chunks for seg in p.feed(c)] + p.finish()
    out = []
    for kind, value in raw:
        if out and kind != "tool_use" and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


DEEPSEEK = (
    "<think>\nThe user wants a.py. I should read it.\n</think>\n\n"
    "Let me read it.\n"
    '<tool_call>\n{"name": "Read", "arguments": {"file_path": "a.py"}}\n</tool_call>\n'
    '<tool_call>{"name": "Bash", "arguments": "{\\"command\\": \\"ls\\"}"}</tool_call>'
)
DEEPSEEK_SEGMENTS = [
    ("thinking", "The user wants a.py. I should read it."),
    ("text", "Let me read it."),
    ("tool_use", {"name": "Read", "input": {"file_path": "a.py"}}),
    ("tool_use", {"name": "Bash", "input": {"command": "ls"}}),
]


def test_think_text_and_two_tool_calls_whole():
    assert parse([DEEPSEEK]) == DEEPSEEK_SEGMENTS


def test_every_split_point_and_every_pair_of_split_points():
    for i in range(len(DEEPSEEK) + 1):
        assert parse([DEEPSEEK[:i], DEEPSEEK[i:]]) == DEEPSEEK_SEGMENTS, i
        for j in range(i, len(DEEPSEEK) + 1, 7):
            assert parse([DEEPSEEK[:i], DEEPSEEK[i:j], DEEPSEEK[j:]]) == DEEPSEEK_SEGMENTS, (i, j)
    assert parse(list(DEEPSEEK)) == DEEPSEEK_SEGMENTS  # one character a delta


def test_text_without_tags_comes_out_exactly_as_it_went_in():
    for text in ["  hello\n", "\r", "a < b <th", " <thin", "x <tool_call", "use <think> tags like this"]:
        for tools in (frozenset(), TOOLS):
            assert parse(list(text), tools) == [("text", text)], (text, tools)


def test_think_counts_only_at_the_start():
    assert parse(["Answer: <think>x</think>"]) == [("text", "Answer: <think>x</think>")]
    assert parse(["  \n<think>x</think>y"]) == [("thinking", "x"), ("text", "y")]


def test_unclosed_think_is_thinking_and_unclosed_tool_call_is_text():
    assert parse(["<think>cut at max_tok"]) == [("thinking", "cut at max_tok")]
    assert parse(['ok \n<tool_call>{"name": "Re']) == [("text", 'ok \n<tool_call>{"name": "Re')]


def test_tool_calls_that_are_not_for_us_stay_text():
    cases = [
        '<tool_call>{"name": "Delete", "arguments": {}}</tool_call>',  # not a declared tool
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "Read", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>["Read"]</tool_call>',
    ]
    for text in cases:
        assert parse([text]) == [("text", text)], text
        assert parse(list("see \n" + text + " ok")) == [("text", "see \n" + text + " ok")], text
    # Without declared tools the tag means nothing at all.
    call = '<tool_call>{"name": "Read", "arguments": {}}</tool_call>'
    assert parse([call], frozenset()) == [("text", call)]


def test_parameters_spelling_and_missing_arguments():
    assert parse(['<tool_call>{"name": "Read", "parameters": {"file_path": "x"}}</tool_call>']) == [("tool_use", {"name": "Read", "input": {"file_path": "x"}})]
    assert parse(['<tool_call>{"name": "Bash"}</tool_call>']) == [("tool_use", {"name": "Bash", "input": {}})]


# ------------------------------------------------------------ property

# Every piece of a tag but its ">", so the parser sees many near-misses and no whole tag.
plain = st.lists(st.sampled_from(list("ab </\n{}\"_:") + ["think", "tool", "call", "<think", "</think", "<tool_call", "</tool_call"]), max_size=12).map("".join)


@st.composite
def contents(draw):
    """A reply as a model writes it, and the segments it stands for."""
    text, expected = "", []
    if draw(st.booleans()):
        thought = draw(plain).strip()
        text += draw(st.sampled_from(["", "\n", "  "])) + "<think>" + draw(st.sampled_from(["", "\n"])) + thought + "\n</think>\n\n"
        if thought:
            expected.append(("thinking", thought))
    for _ in range(draw(st.integers(0, 3))):
        words = draw(plain).strip()
        if words:
            text += words
            expected.append(("text", words))
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(TOOLS)))
            args = draw(st.dictionaries(st.sampled_from(["path", "n", "x"]), st.one_of(st.integers(), st.text(max_size=5)), max_size=2))
            text += "\n<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>\n"
            expected.append(("tool_use", {"name": name, "input": args}))
    merged = []
    for kind, value in expected:
        if merged and kind == "text" and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return text, merged


@PROPERTY
@given(contents(), st.data())
def test_property_any_chunking_gives_the_segments_the_text_stands_for(case, data):
    text, expected = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert parse([text]) == expected
    assert parse(chunks) == expected
