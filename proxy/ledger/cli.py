"""``weir usage``, ``weir requests tail``, ``weir dlq list|show|replay``.

Clients of a running Weir's admin API, not of the database: the same answers
whichever backend the server writes to, and no database credentials on the
operator's laptop. ``--url`` (or ``$WEIR_URL``) names the server,
``--admin-key`` (or ``$WEIR_ADMIN_KEY``) its admin key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

__all__ = ["add_commands"]

# How often ``requests tail`` asks for new rows; the writer flushes every
# 200 ms by default, so a second shows rows within about that.
_TAIL_EVERY_S = 1.0
# Rows re-asked for on every poll, by end time: a row is written up to one
# flush interval after its request ended, so the window must cover that
# (and a slow writer) with room to spare; ids already shown are skipped.
_TAIL_WINDOW_S = 30.0


class _AdminError(Exception):
    pass


def _client(ns: argparse.Namespace) -> Any:
    import httpx

    key = ns.admin_key or os.environ.get("WEIR_ADMIN_KEY", "")
    return httpx.Client(base_url=ns.url, headers={"x-api-key": key} if key else {}, timeout=60.0)


def _get(ns: argparse.Namespace, path: str, params: dict | None = None, method: str = "GET") -> Any:
    import httpx

    try:
        with _client(ns) as c:
            r = c.request(method, path, params={k: v for k, v in (params or {}).items() if v not in (None, "")})
    except httpx.HTTPError as exc:
        raise _AdminError(f"cannot reach {ns.url}: {exc}") from None
    try:
        doc = r.json()
    except ValueError:
        raise _AdminError(f"{ns.url}{path}: HTTP {r.status_code}, not JSON") from None
    if r.status_code >= 400:
        msg = doc.get("error", {}).get("message", r.text) if isinstance(doc, dict) else r.text
        raise _AdminError(f"{path}: HTTP {r.status_code}: {msg}")
    return doc


def _table(rows: list[dict], cols: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6f}"
    return "" if v is None else str(v)


def _ts(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _usage(ns: argparse.Namespace) -> int:
    doc = _get(ns, "/admin/usage", {"group_by": ns.group_by, "since": ns.since, "until": ns.until})
    if ns.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(_table(doc["data"], [ns.group_by, "requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "cost_usd"]))
    print(f"\nprices: {doc.get('price_version', '')}")
    return 0


_TAIL_COLS = ("ended", "request_id", "tenant", "model", "target", "status", "outcome", "cache", "input_tokens", "output_tokens", "cost_micros", "total_ms")


def _tail(ns: argparse.Namespace) -> int:
    # A trio program like the rest of Weir: the poll's HTTP call runs in a
    # worker thread, the wait between polls is trio's.
    import trio

    return trio.run(_follow, ns)


async def _follow(ns: argparse.Namespace) -> int:
    import trio

    seen: dict[str, float] = {}
    start = time.time() - ns.since_s
    print("  ".join(_TAIL_COLS), flush=True)
    while True:
        now = time.time()
        params = {"ended_since": str(max(start, now - _TAIL_WINDOW_S)), "tenant": ns.tenant, "limit": "1000"}
        doc = await trio.to_thread.run_sync(lambda: _get(ns, "/admin/requests", params))
        fresh = [r for r in doc["data"] if r["request_id"] + str(r["started_at"]) not in seen]
        for r in sorted(fresh, key=lambda r: r["ended_at"]):
            seen[r["request_id"] + str(r["started_at"])] = now
            if ns.json:
                print(json.dumps(r), flush=True)
            else:
                vals = [_ts(r["ended_at"]), r["request_id"], r["tenant"], r["model"], r["target"], r["status"], r["outcome"], r["cache"], r["input_tokens"], r["output_tokens"], r["cost_micros"], f"{r['total_us'] / 1000:.1f}"]
                print("  ".join(_fmt(v) for v in vals), flush=True)
        for k in [k for k, t in seen.items() if t < now - 2 * _TAIL_WINDOW_S]:
            del seen[k]
        if ns.once:
            return 0
        await trio.sleep(_TAIL_EVERY_S)


def _dlq(ns: argparse.Namespace) -> int:
    if ns.action == "list":
        doc = _get(ns, "/admin/dlq", {"limit": str(ns.limit), "since": ns.since})
        if ns.json:
            print(json.dumps(doc, indent=2))
        else:
            rows = [{**r, "started": _ts(r["started_at"])} for r in doc["data"]]
            print(_table(rows, ["id", "started", "request_id", "tenant", "model", "status", "error_type", "replayed_request_id", "replayed_status"]))
        return 0
    if not ns.id:
        raise _AdminError(f"weir dlq {ns.action}: give the entry id (see weir dlq list)")
    if ns.action == "show":
        print(json.dumps(_get(ns, f"/admin/dlq/{ns.id}"), indent=2))
        return 0
    doc = _get(ns, f"/admin/dlq/{ns.id}/replay", method="POST")
    print(json.dumps(doc) if ns.json else f"replayed {ns.id} as {doc['request_id']}: HTTP {doc['status']}")
    return 0 if doc["status"] < 400 else 1


def _run(fn: Any) -> Any:
    def go(ns: argparse.Namespace) -> int:
        try:
            return fn(ns)
        except _AdminError as exc:
            print(f"weir: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0

    return go


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("WEIR_URL", "http://127.0.0.1:8080"), help="Weir's address (default $WEIR_URL or http://127.0.0.1:8080)")
    p.add_argument("--admin-key", help="the admin key (default $WEIR_ADMIN_KEY)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_commands(sub: Any) -> None:
    u = sub.add_parser("usage", help="usage and cost from the ledger, grouped")
    _common(u)
    u.add_argument("--group-by", default="tenant", choices=["tenant", "model", "project", "kind", "target", "batch"])
    u.add_argument("--since", default="30d", help="ISO 8601, epoch seconds or a span back (24h, 7d); default 30d")
    u.add_argument("--until", help="same forms as --since")
    u.set_defaults(func=_run(_usage))

    r = sub.add_parser("requests", help="the ledger's request rows")
    rsub = r.add_subparsers(dest="action", required=True)
    t = rsub.add_parser("tail", help="follow new rows live")
    _common(t)
    t.add_argument("--tenant")
    t.add_argument("--since-s", type=float, default=0.0, help="also show rows ended this many seconds ago (default: only new ones)")
    t.add_argument("--once", action="store_true", help="print what is there and exit")
    t.set_defaults(func=_run(_tail))

    d = sub.add_parser("dlq", help="the dead-letter queue: list, show, replay")
    _common(d)
    d.add_argument("action", choices=["list", "show", "replay"])
    d.add_argument("id", nargs="?", help="entry id (show, replay)")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--since", help="list entries since (ISO 8601, epoch seconds or 24h)")
    d.set_defaults(func=_run(_dlq))
