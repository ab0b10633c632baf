"""Claude-Code-shaped requests for the benchmark and the locust suite.

A proxy's cost grows with what it receives: a 300-byte ``"Hello"`` body
flatters every server. Claude Code, Weir's main client, sends 30-200 KiB on
every turn — a system prompt in text blocks, a dozen tools with JSON schemas,
adaptive ``thinking``, ``output_config``, ``metadata``,
``context_management`` and the whole history, with a ``role: "system"`` item
after the first user turn — and eight ``anthropic-beta`` values (Claude Code
2.1.x's shape). These builders make bodies of that shape and size,
deterministically (seeded), from the standard library only, so the locust
venv (which has neither trio nor msgspec) can import this module too.

The body never asks for a tool by the mock upstream's rule ("use a tool",
"use the NAME tool"), so replies are text (plus thinking), and ``metadata``
and the rest are fields Weir must forward untouched, which is exactly what
the benchmark pays for.
"""

from __future__ import annotations

import json
import random

__all__ = [
    "ANTHROPIC_BETA",
    "MODEL",
    "claude_code_body",
    "claude_code_headers",
    "count_tokens_body",
]

# The model Claude Code 2.1.x asks for by default at the time of writing.
MODEL = "claude-opus-5-5"
# What Claude Code 2.1.x sends with a main-loop request: eight betas in one header.
ANTHROPIC_BETA = ",".join(
    [
        "claude-code-20250219",
        "oauth-2025-04-20",
        "interleaved-thinking-2025-05-14",
        "fine-grained-tool-streaming-2025-05-14",
        "context-management-2025-06-27",
        "context-1m-2025-08-07",
        "thinking-display-updates-2026-08-18",
        "mid-conversation-system-clear-at-2026-08-21",
    ]
)
# Claude Code 2.1.x's max_tokens for Opus; the mock honours it.
_MAX_TOKENS = 128000
# ~45 KB lands mid-range of the 30-60 KB the benchmark brief asks for, near a
# mid-session Claude Code turn.
DEFAULT_TARGET_BYTES = 45_000

_WORDS = (
    "the file function module test request response stream token cache client server "
    "upstream proxy header body value error retry limit schema tool input output user "
    "assistant message content block system prompt context session commit branch path "
    "directory command shell read write edit search pattern result line column range "
    "return import class method argument default config setting option flag build run "
    "check review change update create delete list find replace match index offset"
).split()

_TOOLS: list[tuple[str, dict[str, str], list[str]]] = [
    ("Task", {"description": "string", "prompt": "string", "subagent_type": "string"}, ["description", "prompt"]),
    ("Bash", {"command": "string", "timeout": "number", "description": "string", "run_in_background": "boolean"}, ["command"]),
    ("Glob", {"pattern": "string", "path": "string"}, ["pattern"]),
    ("Grep", {"pattern": "string", "path": "string", "glob": "string", "output_mode": "string", "-i": "boolean", "-n": "boolean", "head_limit": "number", "multiline": "boolean"}, ["pattern"]),
    ("ExitPlanMode", {"plan": "string"}, ["plan"]),
    ("Read", {"file_path": "string", "offset": "number", "limit": "number"}, ["file_path"]),
    ("Edit", {"file_path": "string", "old_string": "string", "new_string": "string", "replace_all": "boolean"}, ["file_path", "old_string", "new_string"]),
    ("MultiEdit", {"file_path": "string", "edits": "array"}, ["file_path", "edits"]),
    ("Write", {"file_path": "string", "content": "string"}, ["file_path", "content"]),
    ("NotebookEdit", {"notebook_path": "string", "cell_id": "string", "new_source": "string", "cell_type": "string", "edit_mode": "string"}, ["notebook_path", "new_source"]),
    ("WebFetch", {"url": "string", "prompt": "string"}, ["url", "prompt"]),
    ("TodoWrite", {"todos": "array"}, ["todos"]),
    ("WebSearch", {"query": "string", "allowed_domains": "array", "blocked_domains": "array"}, ["query"]),
    ("BashOutput", {"bash_id": "string", "filter": "string"}, ["bash_id"]),
    ("KillShell", {"shell_id": "string"}, ["shell_id"]),
]


def _prose(rng: random.Random, n_bytes: int) -> str:
    out: list[str] = []
    size = 0
    while size < n_bytes:
        sentence = " ".join(rng.choices(_WORDS, k=rng.randint(8, 20))).capitalize() + "."
        out.append(sentence)
        size += len(sentence) + 1
    return " ".join(out)


def _tool(rng: random.Random, name: str, props: dict[str, str], required: list[str], desc_bytes: int) -> dict:
    properties: dict[str, dict] = {}
    for prop, kind in props.items():
        schema: dict = {"type": kind, "description": _prose(rng, 90)}
        if kind == "array":
            schema["items"] = {"type": "object", "properties": {"content": {"type": "string"}, "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]}}, "required": ["content", "status"], "additionalProperties": False}
        properties[prop] = schema
    return {
        "name": name,
        "description": _prose(rng, desc_bytes),
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }


def _body(rng: random.Random, target_bytes: int) -> dict:
    # Roughly Claude Code's proportions: tools ~45%, system ~30%, history ~25%.
    tool_desc = max(200, int(target_bytes * 0.45 / len(_TOOLS)) - 700)
    system_bytes = int(target_bytes * 0.30)
    turn_bytes = max(200, int(target_bytes * 0.25 / 6))
    cache = {"type": "ephemeral"}
    system = [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": cache},
        {"type": "text", "text": _prose(rng, system_bytes), "cache_control": cache},
    ]
    tools = [_tool(rng, name, props, req, tool_desc) for name, props, req in _TOOLS]
    tools[-1]["cache_control"] = cache
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\n" + _prose(rng, turn_bytes) + "\n</system-reminder>"},
            {"type": "text", "text": _prose(rng, 200)},
        ]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment\n" + _prose(rng, 300)}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": _prose(rng, turn_bytes // 2), "signature": "Eq" + "A" * 300},
            {"type": "tool_use", "id": "toolu_01AbCdEfGhIjKlMnOpQrStUv", "name": "Read", "input": {"file_path": "/work/main/proxy/app.py"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01AbCdEfGhIjKlMnOpQrStUv", "content": _prose(rng, turn_bytes * 2)},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": _prose(rng, turn_bytes // 2)}]},
        {"role": "user", "content": [{"type": "text", "text": _prose(rng, 300), "cache_control": cache}]},
    ]
    return {
        "model": MODEL,
        "messages": messages,
        "temperature": 1,
        "system": system,
        "tools": tools,
        "metadata": {"user_id": "user_" + "%064x" % rng.getrandbits(256) + "_account__session_4f6c1a9e-3b2d-4e8f-9a7c-1d2e3f4a5b6c"},
        "max_tokens": _MAX_TOKENS,
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "medium"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    }


def claude_code_body(stream: bool, target_bytes: int = DEFAULT_TARGET_BYTES, seed: int = 0) -> bytes:
    """A Messages request body of about ``target_bytes``, as Claude Code would send it."""
    body = _body(random.Random(seed), target_bytes)
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def count_tokens_body(target_bytes: int = DEFAULT_TARGET_BYTES, seed: int = 0) -> bytes:
    """The same conversation as a ``/v1/messages/count_tokens`` body (no max_tokens, no stream)."""
    body = _body(random.Random(seed), target_bytes)
    for field in ("max_tokens", "temperature", "metadata", "context_management", "output_config"):
        body.pop(field)
    return json.dumps(body, separators=(",", ":")).encode()


def claude_code_headers(api_key: str = "sk-ant-api03-bench-not-a-real-key") -> dict[str, str]:
    """Headers Claude Code sends with every Messages request (key is a placeholder)."""
    return {
        "content-type": "application/json",
        "accept": "application/json",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": ANTHROPIC_BETA,
        "anthropic-dangerous-direct-browser-access": "true",
        "x-api-key": api_key,
        "x-app": "cli",
        "user-agent": "claude-cli/2.1.0 (external, cli)",
        "x-stainless-lang": "js",
        "x-stainless-package-version": "0.60.0",
        "x-stainless-os": "Linux",
        "x-stainless-arch": "x64",
        "x-stainless-runtime": "node",
        "x-stainless-runtime-version": "v22.17.0",
        "x-stainless-retry-count": "0",
        "x-stainless-timeout": "600",
    }
