"""A value that fits a JSON Schema: the mock's tool inputs and structured outputs.

A client's tool loop validates the input it is handed, and a structured-output
client parses the answer against its schema; a mock that answered with
arbitrary JSON would fail both at the first step. ``fit`` builds a small
deterministic instance (words from the mock's vocabulary, drawn from the
caller's seeded generator) for the subset of JSON Schema that tool
definitions and structured outputs use in practice — what Pydantic, Zod and
Claude Code's own tools emit:

``type`` (one or a list), ``properties`` (every one filled, required or
not), ``items``, ``minItems``/``maxItems``, ``enum``, ``const``,
``anyOf``/``oneOf`` (the first branch), ``allOf`` (merged), local ``$ref``
(``#/$defs/…``, ``#/definitions/…``), ``minimum``/``maximum`` and their
exclusive forms, ``minLength``/``maxLength``, and the common string
``format`` values. ``pattern`` and ``multipleOf`` are not honoured.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["fit"]

# Recursive schemas (a tree node holding nodes) stop here: below this depth an
# object gets only its required properties and an array only its minItems.
_MAX_DEPTH = 6
# Integers when the schema sets no bounds: small, positive, readable.
_DEFAULT_RANGE = (1, 100)
_FORMATS = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00Z",
    "email": "mock@example.com",
    "uri": "https://example.com/mock",
    "url": "https://example.com/mock",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "hostname": "example.com",
}


def fit(schema: Any, rng: random.Random, words: tuple[str, ...]) -> Any:
    """An instance of ``schema``; ``words`` are the strings to draw from."""
    return _fit(schema, schema, rng, words, 0)


def _resolve(root: Any, ref: str) -> Any:
    node = root
    if not ref.startswith("#"):
        return {}  # a remote $ref: nothing to read, so anything fits
    for part in ref[1:].split("/"):
        if not part:
            continue
        if not isinstance(node, dict):
            return {}
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {})
    return node


def _fit(schema: Any, root: Any, rng: random.Random, words: tuple[str, ...], depth: int) -> Any:
    if not isinstance(schema, dict):
        return rng.choice(words)  # true or {}: anything validates
    if isinstance(schema.get("$ref"), str) and depth <= _MAX_DEPTH * 2:
        return _fit(_resolve(root, schema["$ref"]), root, rng, words, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[rng.randrange(len(enum))]
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return _fit(branches[0], root, rng, words, depth)
    if isinstance(schema.get("allOf"), list):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, dict):
                merged = {**merged, **part, "properties": {**merged.get("properties", {}), **part.get("properties", {})}}
        return _fit(merged, root, rng, words, depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties")
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        out: dict[str, Any] = {}
        if isinstance(props, dict):
            for name, prop in props.items():
                if depth < _MAX_DEPTH or name in required:
                    out[name] = _fit(prop, root, rng, words, depth + 1)
        return out
    if kind == "array":
        low = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
        high = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else max(low, 1)
        n = min(max(low, 1 if depth < _MAX_DEPTH else 0), high)
        return [_fit(schema.get("items", {}), root, rng, words, depth + 1) for _ in range(n)]
    if kind in ("integer", "number"):
        return _number(schema, rng)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema, rng, words)


def _number(schema: dict[str, Any], rng: random.Random) -> int:
    low: int | None = None
    high: int | None = None
    if isinstance(schema.get("minimum"), (int, float)):
        low = -int(-schema["minimum"] // 1)  # ceil
    if isinstance(schema.get("exclusiveMinimum"), (int, float)):
        low = int(schema["exclusiveMinimum"] // 1) + 1
    if isinstance(schema.get("maximum"), (int, float)):
        high = int(schema["maximum"] // 1)
    if isinstance(schema.get("exclusiveMaximum"), (int, float)):
        high = -int(-schema["exclusiveMaximum"] // 1) - 1
    if low is None and high is None:
        low, high = _DEFAULT_RANGE
    elif low is None:
        low = min(_DEFAULT_RANGE[0], high)  # type: ignore[type-var]
    elif high is None:
        high = low + _DEFAULT_RANGE[1] - _DEFAULT_RANGE[0]
    assert low is not None and high is not None
    if low > high:
        return low  # an empty range: nothing fits, and this is the least wrong
    return rng.randint(low, high)


def _string(schema: dict[str, Any], rng: random.Random, words: tuple[str, ...]) -> str:
    value = _FORMATS.get(schema.get("format", ""), "") or rng.choice(words)
    low = schema.get("minLength") if isinstance(schema.get("minLength"), int) else 0
    high = schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else None
    while len(value) < low:
        value += " " + rng.choice(words)
    if high is not None:
        value = value[: max(high, 0)]
    return value
