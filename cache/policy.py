"""When to use the cache: pure decisions for the HTTP layer to call.

LLM replies are not functions of the request unless sampling is
deterministic, so by default (``mode="deterministic"``) only requests with
``temperature == 0`` are served from and stored in the cache. The client can
always overrule per request with the ``x-weir-cache`` header:

- ``x-weir-cache: off`` — never read or write the cache, in every mode.
- ``x-weir-cache: on``  — cache this request even if it samples (the client
  accepts a replayed sample, e.g. a test suite or a batch re-run).

Modes (operator setting):

- ``"deterministic"`` — temperature 0 or opt-in header. An absent
  temperature means Anthropic's default of 1.0, so it is *not* cacheable.
- ``"all"``           — everything unless opted out with the header.
- ``"off"``           — nothing; the header cannot turn it on.

``Cache-Control`` on the request refines this further (``no-store``: do not
write, ``no-cache``: do not read, ``max-age``: accept only entries younger than
this and cap the TTL) — ``parse_cache_control`` reads it; applying it is the
caller's, because it splits read and write decisions.
"""

from __future__ import annotations

import msgspec

__all__ = ["MODES", "CacheControl", "is_cacheable_request", "parse_cache_control"]

MODES = ("deterministic", "all", "off")


class CacheControl(msgspec.Struct, frozen=True):
    no_cache: bool = False
    no_store: bool = False
    max_age: float | None = None


def parse_cache_control(value: str) -> CacheControl:
    """Lenient parse (RFC 9111 §5.2): unknown directives are ignored, and an
    unparsable or negative ``max-age`` is dropped rather than rejecting the
    request — a cache header must never turn a good request into an error."""
    no_cache = no_store = False
    max_age: float | None = None
    for part in value.split(","):
        name, _, arg = part.partition("=")
        name = name.strip().lower()
        arg = arg.strip().strip('"')
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            try:
                seconds = float(arg)
            except ValueError:
                continue
            if seconds >= 0 and seconds == seconds:  # NaN compares unequal to itself
                max_age = seconds
    return CacheControl(no_cache=no_cache, no_store=no_store, max_age=max_age)


def is_cacheable_request(body_obj: dict, opt_in_header: str | None, mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"unknown cache mode {mode!r}; expected one of {MODES}")
    header = (opt_in_header or "").strip().lower()
    if mode == "off" or header == "off":
        return False
    if mode == "all" or header == "on":
        return True
    temperature = body_obj.get("temperature")
    # bool is an int subclass: `"temperature": false` is malformed, not zero.
    return isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0
