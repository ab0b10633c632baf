"""Claude Code's side calls, shaped as it sends them (texts abridged).

Shared by the classifier's unit tests and the end-to-end tests of routes by
kind and local answers.
"""

from __future__ import annotations

import json
from typing import Any

HAIKU = "claude-haiku-4-5-20251001"


def _doc(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": HAIKU, "max_tokens": 512}
    doc.update(fields)
    return doc


def quota_probe() -> dict[str, Any]:
    return _doc(max_tokens=1, messages=[{"role": "user", "content": "quota"}], metadata={"user_id": "user_x"})


def title_v1() -> dict[str, Any]:
    return _doc(
        system=[
            {
                "type": "text",
                "text": "Analyze if this message indicates a new conversation topic. If it does, extract a 2-3 word title "
                "that captures the new topic. Format your response as a JSON object with two fields: 'isNewTopic' "
                "(boolean) and 'title' (string, or null if isNewTopic is false). Only include these fields, no other text.",
            }
        ],
        messages=[{"role": "user", "content": [{"type": "text", "text": "fix the flaky scheduler test"}]}],
        temperature=0,
    )


def title_v2() -> dict[str, Any]:
    return _doc(
        system=[
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {
                "type": "text",
                "text": "Generate a concise, sentence-case title (3-7 words) that captures the main topic or goal of "
                'this coding session. Return JSON with a single "title" field.',
            },
        ],
        messages=[
            {"role": "user", "content": "add request kinds to the proxy"},
            {"role": "system", "content": [{"type": "text", "text": "# Environment\nplatform: linux"}]},
        ],
        output_format={"type": "json_schema", "schema": {"type": "object", "properties": {"title": {"type": "string"}}}},
    )


def bash_prefix() -> dict[str, Any]:
    return _doc(
        system=[{"type": "text", "text": "Your task is to process Bash commands that an AI coding agent wants to run."}],
        messages=[
            {
                "role": "user",
                "content": "<policy_spec>\n# Claude Code Bash command prefix detection\n"
                "This document defines risk levels for actions...\n</policy_spec>\n\n"
                "The user has allowed certain command prefixes to be run...\n\nCommand: git diff --stat HEAD~1",
            }
        ],
    )


def filepath() -> dict[str, Any]:
    return _doc(
        system=[
            {
                "type": "text",
                "text": "Extract any file paths that this command reads or modifies. For commands like \"git diff\" "
                "and \"cat\", include the paths of files being shown. Format your response as <filepaths>...</filepaths>",
            }
        ],
        messages=[{"role": "user", "content": "Command: cat proxy/app.py\nOutput: \"\"\"The ASGI application\"\"\"\n"}],
    )


def suggestion(history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    turns = list(history or [
        {"role": "user", "content": "fix the bug and run tests"},
        {"role": "assistant", "content": [{"type": "text", "text": "Fixed. All 12 tests pass."}]},
    ])
    turns.append(
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "[SUGGESTION MODE: Suggest what the user might naturally type next into Claude Code.]\n\n"
                    "Reply with ONLY the suggestion, no quotes or explanation.",
                }
            ],
        }
    )
    return _doc(messages=turns, tools=[{"name": "Bash", "input_schema": {"type": "object"}}])


def encode(doc: dict[str, Any], **extra: Any) -> bytes:
    """As Claude Code's JSON.stringify writes it: compact, ``<`` unescaped."""
    return json.dumps({**doc, **extra}, separators=(",", ":"), ensure_ascii=False).encode()


ALL = {
    "quota_probe": quota_probe,
    "title": title_v1,
    "bash_prefix": bash_prefix,
    "filepath": filepath,
    "suggestion": suggestion,
}
