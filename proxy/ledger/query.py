"""The admin API's query strings → the stores' ``Query``: pure, with clear errors.

Times (``since``, ``until``) are ISO 8601 (``2026-12-01T09:00:00Z``; no
zone means UTC), seconds since the epoch, or a span back from ``now``
(``30m``, ``24h``, ``7d``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone

from .store import GROUPS, Query

__all__ = ["BadQuery", "parse_time", "requests_query", "usage_query"]

_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_SECONDS = 253_402_300_799.0  # 9999-12-31T23:59:59Z
# Enough for a screen or a script's page; more is what the database is for.
MAX_LIMIT = 1000


class BadQuery(ValueError):
    """A query parameter that cannot be read; the message names it."""


def parse_time(name: str, value: str | None, now: float) -> int | None:
    """µs since the epoch, or None when absent."""
    if value is None or value == "":
        return None
    m = _SPAN.match(value)
    if m:
        seconds = now - float(m.group(1)) * _UNIT[m.group(2)]
    else:
        try:
            seconds = float(value)
        except ValueError:
            try:
                dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise BadQuery(f"{name}: {value!r} is not a time (ISO 8601, epoch seconds, or a span like 24h)") from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            seconds = dt.timestamp()
    # Epoch to year 9999: also keeps inf, nan and 1e400 out of a bigint column.
    if not 0 <= seconds <= _MAX_SECONDS:
        raise BadQuery(f"{name}: {value!r} is outside 1970–9999")
    return int(seconds * 1e6)


def _int(name: str, value: str | None, default: int | None, lo: int, hi: int) -> int | None:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise BadQuery(f"{name}: {value!r} is not an integer") from None
    if not lo <= n <= hi:
        raise BadQuery(f"{name}: must be between {lo} and {hi}")
    return n


def requests_query(args: Mapping[str, str], now: float) -> Query:
    return Query(
        tenant=args.get("tenant") or None,
        model=args.get("model") or None,
        outcome=args.get("outcome") or None,
        batch_id=args.get("batch_id") or None,
        status=_int("status", args.get("status"), None, 0, 999),
        since=parse_time("since", args.get("since"), now),
        until=parse_time("until", args.get("until"), now),
        ended_since=parse_time("ended_since", args.get("ended_since"), now),
        limit=_int("limit", args.get("limit"), 100, 1, MAX_LIMIT) or 100,
    )


def usage_query(args: Mapping[str, str], now: float) -> tuple[str, int | None, int | None]:
    """``group_by`` (a rollup key, or ``batch``), ``since``, ``until``.

    ``batch``: usage per Message Batch, from the batch items' own rows (the
    hourly rollups have no batch); ``batch_id=msgbatch_…`` names one batch
    and implies it."""
    group = args.get("group_by") or ("batch" if args.get("batch_id") else "tenant")
    if group not in GROUPS and group != "batch":
        raise BadQuery(f"group_by: {group!r} is not one of {', '.join((*GROUPS, 'batch'))}")
    if args.get("batch_id") and group != "batch":
        raise BadQuery("batch_id: only with group_by=batch (usage per batch comes from the batch items' rows)")
    return group, parse_time("since", args.get("since"), now), parse_time("until", args.get("until"), now)


def limit_of(args: Mapping[str, str]) -> int:
    return _int("limit", args.get("limit"), 100, 1, MAX_LIMIT) or 100
