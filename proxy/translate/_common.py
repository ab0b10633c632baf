"""Pieces both translation directions share.

Kept private: the public names are re-exported from ``proxy.translate``.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

__all__ = [
    "TranslationError",
    "parse_arguments",
    "encode_json",
    "budget_to_effort",
    "effort_to_budget",
]

# msgspec's encoder is several times faster than json.dumps and emits no
# spaces, so an SSE ``data:`` line never contains a newline.
encode_json = msgspec.json.Encoder().encode


class TranslationError(ValueError):
    """The request cannot be expressed in the other API at all.

    The HTTP layer answers it with a 400 ``invalid_request_error``: the
    request is the client's mistake (or asks for something the other side has
    no word for), so retrying it elsewhere would not help.
    """


def parse_arguments(raw: Any) -> dict[str, Any]:
    """OpenAI tool arguments (a JSON *string*) → an Anthropic tool ``input`` (an object).

    Models served through OpenAI-compatible servers get this wrong in a few
    recurring ways, each handled here rather than failing the whole response:
    an empty string for a tool without parameters (→ ``{}``), the object
    encoded twice (a JSON string holding JSON, → decoded again), or text that
    is not JSON at all. That last one becomes ``{"_raw_arguments": raw}``:
    Anthropic requires an object, and keeping the raw text — instead of a bare
    ``{}`` — lets the client's tool validation report it back to the model and
    leaves it visible in transcripts and logs.
    """
    if isinstance(raw, dict):
        return raw
    if raw is None:
        return {}
    if not isinstance(raw, str):
        return {"_raw_arguments": raw}
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"_raw_arguments": raw}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {"_raw_arguments": raw}
    if isinstance(value, dict):
        return value
    return {"_raw_arguments": raw}


# Anthropic sizes extended thinking in tokens, OpenAI in three words. The
# boundaries come from Claude Code's own keyword budgets: "think" asks for
# ~4k tokens, "think hard" ~10k, "ultrathink" ~32k — one per effort level.
_EFFORT_CEILINGS = (("low", 4096), ("medium", 16384))
_EFFORT_BUDGETS = {"minimal": 1024, "low": 4096, "medium": 16384, "high": 32768}
# 1024 is the smallest budget_tokens Anthropic accepts.
MIN_THINKING_BUDGET = 1024


def budget_to_effort(budget: int) -> str:
    for effort, ceiling in _EFFORT_CEILINGS:
        if budget <= ceiling:
            return effort
    return "high"


def effort_to_budget(effort: str) -> int | None:
    """``None`` for efforts that mean "don't think" (``none``) or that we don't know."""
    return _EFFORT_BUDGETS.get(effort)
