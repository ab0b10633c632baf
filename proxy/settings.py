"""One ``Settings`` tree builds one app.

Read from a TOML file (``--config`` or ``WEIR_CONFIG``) and overridden by
``WEIR_<SECTION>__<FIELD>`` environment variables (``WEIR_SERVER__PORT=9000``).
Every Struct forbids unknown fields, so a mistyped key stops start-up with a
message naming it instead of being silently ignored — the classic way a
gateway ends up running without the limit its operator thought they set.

A few flat variables cover the quick start without a file:
``WEIR_UPSTREAM_URL``, ``WEIR_UPSTREAM_KIND``, ``WEIR_UPSTREAM_MODEL`` and
``WEIR_UPSTREAM_KEY_ENV`` describe a single upstream.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from mock import MockSettings

from .breaker import BreakerConfig
from .datadir import resolve_data_dir
from .kinds import KINDS
from .local_answers import ANSWERABLE
from .retry import RetryConfig

__all__ = ["Settings", "SettingsError", "load_settings", "settings_from_dict"]

MiB = 1024 * 1024


class SettingsError(Exception):
    """The configuration cannot start a server; the message says which key."""


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Base):
    host: str = "127.0.0.1"  # loopback by default: exposing a gateway is a decision, not a default
    port: int = 8080
    workers: int = 1
    # Anthropic's own request size limit for the Messages API is 32 MB.
    max_body_bytes: int = 32 * MiB
    # Long LLM streams run for minutes; a drain shorter than one generation
    # cuts replies off on every deploy. Ten minutes matches Anthropic's
    # non-streaming request ceiling.
    drain_s: float = 600.0
    # How long /ready reports 503 before listeners close, so a load balancer
    # polling every few seconds stops routing here first (Kubernetes probes
    # default to a 10 s period; 0 for tests and single-host use).
    drain_notice_s: float = 0.0
    # Idle keep-alive connections: Claude Code keeps one connection per
    # session and pauses between turns, often for longer than Hypercorn's 5 s.
    keep_alive_s: float = 75.0
    # The whole request head must arrive within this (from accept for a
    # connection's first request, from its first byte after that): a live
    # client sends a head of a few KB in one round trip, and 10 s still covers
    # three lost segments (RFC 6298: 1 s initial RTO, doubling: 1+2+4 s).
    # Past it: 408 and close (slowloris).
    header_timeout_s: float = 10.0
    # Longest silence while a request body is being received: nginx's
    # client_body_timeout default. Past it: 408 and close.
    body_idle_s: float = 60.0
    access_log: bool = True
    log_level: str = "info"
    # Freeze everything built at start-up out of the cycle collector
    # (gc.freeze): a full collection then walks only request garbage, not the
    # ~85,000 start-up objects (docs/ARCHITECTURE.md). Off only for processes
    # that start many apps (the test suite).
    gc_freeze: bool = True
    # Every file Weir writes lives under this directory (the SQLite L2 is
    # cache.db in it). Empty: $STATE_DIRECTORY (systemd), else
    # $XDG_STATE_HOME/weir, else ~/.local/state/weir — see proxy/datadir.py.
    # Made absolute at load.
    data_dir: str = ""

    def data_path(self, name: str) -> str:
        """The path of one of Weir's files: always inside ``data_dir``."""
        return os.path.join(self.data_dir, name)


class DeadlineSettings(_Base):
    connect_s: float = 10.0  # TCP + TLS to the upstream; the Anthropic SDK uses 5-10 s too
    # Time to the response head. Extended thinking can hold the head of a
    # non-streamed reply for minutes, so it is generous by default.
    first_byte_s: float = 600.0
    # The whole request; Anthropic closes non-streaming requests at 10 minutes.
    total_s: float = 600.0
    # How long a stream may go without a byte before it is treated as hung.
    # Anthropic sends a ping at least every ~15 s during long thinking.
    idle_s: float = 120.0
    # Per-attempt budget for the response head when a route has a next target
    # (Envoy's per_try_timeout): past it, fail over instead of waiting out
    # first_byte_s on a stuck target. 0 = off: long thinking can legitimately
    # hold a head for minutes, so only a route's owner can say what "stuck" is.
    per_try_first_byte_s: float = 0.0


class UpstreamSettings(_Base):
    """One upstream target: a provider endpoint with its keys and connection budget."""

    name: str = "default"
    kind: Literal["anthropic", "openai"] = "anthropic"
    # Anthropic: base URL without /v1 (as ANTHROPIC_BASE_URL); OpenAI: with /v1
    # (as OPENAI_BASE_URL). Empty: the built-in mock upstream.
    url: str = ""
    # Replace the requested model with this one (an OpenAI-compatible server
    # rarely serves a model called claude-*).
    model: str = ""
    api_keys: list[str] = []
    # Names of environment variables holding keys; kept out of config files.
    api_key_envs: list[str] = []
    # The connection budget: the pool's size and the in-flight cap in front
    # of it, so the pool never queues waiters (docs/ARCHITECTURE.md: 64 in
    # flight on one httpx client collapsed to ~350 req/s; capped at the pool
    # it held ~1,000).
    max_connections: int = 64
    # Extra headers sent upstream (e.g. OpenRouter's HTTP-Referer).
    headers: dict[str, str] = {}
    # The provider's own quota for this target (0 = none known): requests
    # beyond it wait in the target's fair queue, spread evenly, instead of
    # being sent to fail with 429 (NVIDIA NIM's free tier: 40 requests a
    # minute). See PaceBudget in proxy/scheduler.py for the pacing rule.
    requests_per_minute: float = 0.0
    # Estimated input tokens (request bytes / 4) per minute; 0 = none known.
    tokens_per_minute: float = 0.0
    # Requests that may go back to back before pacing spreads the rest: 2 lets
    # a turn's main call and its side call leave together without letting a
    # backlog hit the provider at once (the default; 1 = strictly even).
    burst: int = 2
    # Message Batches for this target (issue 13): "weir" runs every item
    # through Weir's own request path (the only way for an OpenAI-kind
    # target, which has no batch API); "passthrough" hands the batch to
    # Anthropic's own batch API (Anthropic-kind only). None = the kind's
    # default: passthrough for anthropic, weir for openai.
    batches: Literal["weir", "passthrough"] | None = None

    def batch_mode(self) -> Literal["weir", "passthrough"]:
        if self.batches is not None:
            return self.batches
        return "passthrough" if self.kind == "anthropic" else "weir"

    def keys(self, environ: Mapping[str, str]) -> list[str]:
        found = list(self.api_keys)
        for var in self.api_key_envs:
            value = environ.get(var, "")
            if value:
                found.append(value)
        return found


class ClientKey(_Base):
    tenant: str
    key: str = ""
    key_env: str = ""
    weight: float = 1.0


class AuthSettings(_Base):
    client_keys: list[ClientKey] = []
    # Admin API key (cache purge, key pools, breakers); empty disables the admin API.
    admin_key: str = ""
    admin_key_env: str = ""


class RouteSettings(_Base):
    """A requested model (and request kind) → an ordered chain of targets.

    ``match`` is an exact model name, an alias, or a glob (``*haiku*``; the
    default ``*`` is every model); ``kind``, when set, limits the route to
    one request kind (proxy/kinds.py: ``title``, ``quota_probe``…), so
    Claude Code's side calls can go to a cheap target. Routes are tried in
    file order and the first match wins. Each entry of ``targets`` is
    ``"upstream-name"`` or ``"upstream-name:model"`` (send that model name to
    that upstream instead of the requested one).
    """

    match: str = "*"
    targets: list[str] = []
    kind: str = ""


class ClaudeCodeSettings(_Base):
    # Request kinds (proxy/kinds.py) Weir answers itself, with zero usage and
    # no upstream call (proxy/local_answers.py). Empty by default: answering
    # for a model is the operator's call, never Weir's.
    answer_locally: list[str] = []


class SchedulerSettings(_Base):
    # "fair": deficit round-robin over tenants; "fifo": one semaphore (for comparison).
    policy: Literal["fair", "fifo"] = "fair"
    # Waiters per target before new ones are shed with 529: 8 connection
    # budgets' worth, i.e. several seconds of backlog at LLM latencies.
    max_queue: int = 512
    # One tenant may hold at most this share of the queue, so a flood from one
    # key sheds its own excess rather than everyone's (0 = no per-tenant bound).
    max_queue_per_tenant: int = 256
    # A backlogged lower priority class gets at least 1 grant in this many.
    starvation_limit: int = 10
    # tenant → weight (default 1.0); the client key's weight applies otherwise.
    weights: dict[str, float] = {}


class RateLimitSettings(_Base):
    # 0 = unlimited. Per tenant, per minute, like Anthropic's own limits.
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    # tenant → {requests_per_minute, tokens_per_minute}
    tenants: dict[str, dict[str, int]] = {}
    # Empty: in-process buckets (one budget per worker). A redis:// URL: one
    # budget shared by every worker and host.
    redis_url: str = ""


class CacheSettings(_Base):
    # "deterministic": temperature 0 or `x-weir-cache: on`; "all"; "off".
    mode: Literal["deterministic", "all", "off"] = "deterministic"
    coalesce: bool = True
    # An hour: long enough to absorb retries and re-runs, short enough that a
    # model update is noticed the same day.
    ttl_s: float = 3600.0
    l1_max_bytes: int = 256 * MiB
    # "sqlite" (cache.db in server.data_dir, shared by a host's workers),
    # "redis" (shared by hosts), or "none".
    l2: Literal["sqlite", "redis", "none"] = "sqlite"
    sqlite_max_bytes: int = 2 * 1024 * MiB
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Streams bigger than this are relayed but not cached.
    max_entry_bytes: int = 8 * MiB
    # Cross-worker singleflight lease on a missed key (L2). Long enough to
    # cover a typical generation (most replies finish well within a minute);
    # if the holder takes longer or dies, waiters give up after this and call
    # upstream themselves, so it also bounds the worst extra wait.
    lease_s: float = 60.0
    # How often a worker that lost the lease looks for the winner's entry:
    # an SQLite read is ~50 us and a Redis GET ~100 us on loopback, so 50 ms
    # costs L2 nothing and adds at most 50 ms to a multi-second reply.
    lease_poll_s: float = 0.05


class MetricsSettings(_Base):
    """``GET /metrics`` (Prometheus) and the gauges behind it."""

    enabled: bool = True
    # Off by default: label values name tenants, models and key ids, which is
    # the admin's business. A scraper on a trusted network may be let in.
    public: bool = False
    # How often each worker copies breaker, key, cache and ledger state into
    # its gauges: well under Prometheus' usual 15-60 s scrape interval.
    refresh_s: float = 1.0
    # Distinct model names kept as label values (each one an upstream
    # accepted); past it, "other". Bounds the series a client can create.
    max_models: int = 200


class LedgerSettings(_Base):
    """The request ledger (proxy/ledger/): one row per request, off the hot path."""

    # "" = an SQLite file in the data directory (WAL, shared by the host's
    # workers: the embedded default that needs nothing installed);
    # "postgresql://…" for many hosts; "off" disables the ledger.
    url: str = ""
    # Request and response bodies: "off", "errors" (status >= 400) or "all".
    # Off by default: bodies are prompts, and prompts are the tenant's data.
    # A failed-for-good request keeps its request body in the dead-letter
    # queue regardless, so it can be replayed.
    bodies: Literal["off", "errors", "all"] = "off"
    # A body longer than this is stored cut to it (a replay needs the whole
    # request: dead-letter entries keep up to max_body_bytes of the server).
    body_limit_bytes: int = 256 * 1024
    # A month answers "what did we spend last month"; hourly usage rollups
    # are kept for 400 days regardless (they are a few rows per hour).
    retention_days: int = 30
    bodies_retention_days: int = 7
    dlq_retention_days: int = 7
    # Flush every N rows or T ms, whichever first: 200 ms bounds what a
    # kill -9 can lose to a fifth of a second of traffic; 1,000 rows is one
    # COPY of a few hundred KB.
    flush_rows: int = 1000
    flush_interval_ms: float = 200.0
    # A write slower than this counts as an outage: the batch goes to the spool.
    write_timeout_s: float = 2.0
    # Rows held in memory at most (≈ 25 MB); past it new rows are dropped
    # and counted — only reachable when the spool's disk itself stalls.
    max_buffer_rows: int = 50_000
    # PostgreSQL: the schema the ledger's tables live in, and the pool size
    # per worker (one writer and the admin API's reads).
    pg_schema: str = "public"
    pg_max_connections: int = 4
    # The price table: "" = the one shipped in proxy/ledger/prices.toml;
    # [ledger.prices] overrides single models: {"my-model" = {input = 1.0, output = 2.0}}.
    prices_path: str = ""
    prices: dict[str, dict[str, float]] = {}


class BatchSettings(_Base):
    """Message Batches (proxy/batches/): Anthropic's batch API, run by Weir.

    Batches and their items live in the ledger's database (``ledger.url``:
    the SQLite file in the data directory, or PostgreSQL).
    """

    enabled: bool = True
    # Anthropic ends a batch 24 hours after creation, whatever is left expires.
    expiry_s: float = 86_400.0
    # Anthropic keeps results for 29 days.
    results_days: int = 29
    # Anthropic's limits for one batch: 100,000 requests or 256 MB of body.
    max_requests: int = 100_000
    max_bytes: int = 256 * MiB
    # A claimed item whose worker stops renewing its lease is run again after
    # this: a crashed worker's items wait at most a minute, and a minute is
    # many renewals' worth of slack for a live worker on a busy database.
    lease_s: float = 60.0
    # Items one claim takes: a worker's whole concurrency in one round trip.
    claim_size: int = 32
    # Items one worker runs at once. Half the default target's connection
    # budget (upstreams.max_connections = 64): batch items queue at batch
    # priority in the fair queue anyway, this bounds what one worker holds
    # leased and in memory.
    concurrency: int = 32
    # How often a worker looks for items nobody woke it for (another worker's
    # or host's batch, a released item coming due): once a second costs one
    # indexed query a second and starts a batch within a second.
    poll_s: float = 1.0
    # How often a worker ends expired, canceled and finished batches: a few
    # seconds between the last item and ``ended`` is well inside what a
    # client polling a 24-hour batch notices.
    sweep_s: float = 5.0
    # The origin results_url points at ("https://weir.example.com"); "" = the
    # scheme and Host header of the request that asked, right whenever
    # clients reach Weir directly.
    public_url: str = ""


class Settings(_Base):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    deadlines: DeadlineSettings = msgspec.field(default_factory=DeadlineSettings)
    upstreams: list[UpstreamSettings] = []
    routes: list[RouteSettings] = []
    # The policy objects' own configs: their defaults and the reasons for
    # them live in proxy/breaker.py and proxy/retry.py.
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)
    ratelimit: RateLimitSettings = msgspec.field(default_factory=RateLimitSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    # The quick start's mock upstream, started by ``weir serve`` when no
    # upstream has a URL (its knobs are defined once, in ``mock/upstream.py``).
    mock: MockSettings = msgspec.field(default_factory=MockSettings)
    claude_code: ClaudeCodeSettings = msgspec.field(default_factory=ClaudeCodeSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    ledger: LedgerSettings = msgspec.field(default_factory=LedgerSettings)
    batches: BatchSettings = msgspec.field(default_factory=BatchSettings)

    def uses_mock(self) -> bool:
        return not self.upstreams or all(not u.url for u in self.upstreams)


_FLAT_UPSTREAM = {
    "WEIR_UPSTREAM_URL": "url",
    "WEIR_UPSTREAM_KIND": "kind",
    "WEIR_UPSTREAM_MODEL": "model",
    "WEIR_UPSTREAM_KEY_ENV": "api_key_envs",
}
# WEIR_* variables that are not settings: the config path, and test knobs.
_NOT_SETTINGS = {"WEIR_CONFIG", "WEIR_SETTINGS_JSON"}


def _env_overrides(environ: Mapping[str, str], data: dict[str, Any]) -> None:
    for name, value in environ.items():
        if not name.startswith("WEIR_") or name in _NOT_SETTINGS or name.startswith("WEIR_TEST_"):
            continue
        if name in _FLAT_UPSTREAM:
            ups = data.setdefault("upstreams", [])
            if not ups:
                ups.append({})
            field = _FLAT_UPSTREAM[name]
            ups[0][field] = [value] if field == "api_key_envs" else value
            continue
        path = name[len("WEIR_") :].lower().split("__")
        if len(path) != 2 or not all(path):
            # Not ours to judge (WEIR_HYPOTHESIS_EXAMPLES and the like).
            continue
        section, field = path
        if section not in Settings.__struct_fields__ or section == "upstreams":
            raise SettingsError(f"environment variable {name}: unknown settings section {section!r}")
        sect = data.setdefault(section, {})
        if not isinstance(sect, dict):
            raise SettingsError(f"environment variable {name}: section {section!r} is not a table")
        sect[field] = value


def settings_from_dict(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    try:
        settings = msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid configuration: {exc}") from None
    _validate(settings)
    settings.server.data_dir = resolve_data_dir(settings.server.data_dir, os.environ if environ is None else environ)
    return settings


def load_settings(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """TOML file, then ``WEIR_*`` variables, then explicit overrides (CLI flags)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("WEIR_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    _env_overrides(environ, data)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return settings_from_dict(data, environ)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    head, _, rest = dotted.partition(".")
    if head == "upstreams":
        ups = data.setdefault("upstreams", [])
        if not ups:
            ups.append({})
        ups[0][rest] = value
        return
    target = data.setdefault(head, {})
    target[rest] = value


def _validate(s: Settings) -> None:
    names = [u.name for u in s.upstreams]
    if len(set(names)) != len(names):
        raise SettingsError("upstreams: names must be unique")
    for u in s.upstreams:
        if u.max_connections < 1:
            raise SettingsError(f"upstreams[{u.name}].max_connections must be at least 1")
        if u.url and not u.url.startswith(("http://", "https://")):
            raise SettingsError(f"upstreams[{u.name}].url must start with http:// or https://")
        if u.requests_per_minute < 0 or u.tokens_per_minute < 0:
            raise SettingsError(f"upstreams[{u.name}]: requests_per_minute and tokens_per_minute must be 0 (none) or positive")
        if u.burst < 1:
            raise SettingsError(f"upstreams[{u.name}].burst must be at least 1")
        if u.requests_per_minute and u.burst >= u.requests_per_minute:
            raise SettingsError(f"upstreams[{u.name}].burst must be below requests_per_minute")
        if u.batches == "passthrough" and u.kind != "anthropic":
            raise SettingsError(f"upstreams[{u.name}].batches = \"passthrough\" needs kind = \"anthropic\" (only Anthropic has a batch API)")
        if (u.requests_per_minute or u.tokens_per_minute) and s.scheduler.policy != "fair":
            # The FIFO comparison scheduler has no budget: pacing would silently not happen.
            raise SettingsError(f"upstreams[{u.name}]: requests_per_minute/tokens_per_minute need scheduler.policy = \"fair\"")
    known = set(names) | ({"mock"} if s.uses_mock() else set())
    for r in s.routes:
        if not r.targets:
            raise SettingsError(f"routes[{r.match}]: give at least one target")
        if r.kind and r.kind not in KINDS:
            raise SettingsError(f"routes[{r.match}].kind: {r.kind!r} is not a request kind (known: {', '.join(KINDS)})")
        for t in r.targets:
            if t.split(":", 1)[0] not in known:
                raise SettingsError(f"routes[{r.match}]: target {t!r} names no upstream (known: {sorted(known)})")
    for k in s.claude_code.answer_locally:
        if k not in ANSWERABLE:
            raise SettingsError(f"claude_code.answer_locally: {k!r} cannot be answered locally (known: {', '.join(sorted(ANSWERABLE))})")
    for ck in s.auth.client_keys:
        if not ck.key and not ck.key_env:
            raise SettingsError(f"auth.client_keys[{ck.tenant}]: give key or key_env")
    if s.server.max_body_bytes < 1024:
        raise SettingsError("server.max_body_bytes must be at least 1024")
    if s.server.workers < 1:
        raise SettingsError("server.workers must be at least 1")
    d = s.deadlines
    for field in ("connect_s", "first_byte_s", "total_s", "idle_s"):
        if getattr(d, field) <= 0:
            raise SettingsError(f"deadlines.{field} must be positive")
    if s.metrics.refresh_s <= 0:
        raise SettingsError("metrics.refresh_s must be positive")
    lg = s.ledger
    if lg.url not in ("", "off") and not lg.url.startswith(("postgresql://", "postgres://")):
        raise SettingsError("ledger.url must be empty (SQLite in the data directory), \"off\" or a postgresql:// URL")
    if lg.flush_rows < 1 or lg.flush_interval_ms <= 0 or lg.max_buffer_rows < lg.flush_rows:
        raise SettingsError("ledger: flush_rows >= 1, flush_interval_ms > 0 and max_buffer_rows >= flush_rows")
    if min(lg.retention_days, lg.bodies_retention_days, lg.dlq_retention_days) < 1:
        raise SettingsError("ledger: retention days must be at least 1")
    bt = s.batches
    if min(bt.expiry_s, bt.lease_s, bt.poll_s, bt.sweep_s) <= 0:
        raise SettingsError("batches: expiry_s, lease_s, poll_s and sweep_s must be positive")
    if bt.public_url and not bt.public_url.startswith(("http://", "https://")):
        raise SettingsError("batches.public_url must be empty or start with http:// or https://")
    if min(bt.results_days, bt.max_requests, bt.max_bytes, bt.claim_size, bt.concurrency) < 1:
        raise SettingsError("batches: results_days, max_requests, max_bytes, claim_size and concurrency must be at least 1")
    if d.per_try_first_byte_s < 0:
        raise SettingsError("deadlines.per_try_first_byte_s must be 0 (off) or positive")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(s: Settings, environ: Mapping[str, str]) -> None:
    """Refuse to sell our upstream key to the network.

    A gateway bound beyond loopback that adds its own upstream key and asks
    clients for none is an open relay on the operator's bill.
    """
    if is_loopback(s.server.host):
        return
    has_upstream_key = any(u.keys(environ) for u in s.upstreams)
    if has_upstream_key and not s.auth.client_keys:
        raise SettingsError(
            f"refusing to listen on {s.server.host} with an upstream key and no client keys: "
            "configure auth.client_keys, or bind to 127.0.0.1"
        )
