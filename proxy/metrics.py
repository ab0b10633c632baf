"""Prometheus metrics: one update per finished request, gauges read from the components.

prometheus-client, because its multiprocess mode is the one well-kept way to
sum counters over ``--workers N`` processes without a push gateway: each
worker writes its values into an mmap'ed file under
``PROMETHEUS_MULTIPROC_DIR`` and a scrape, on any worker, merges every file.
The library decides the mode once, when it is imported, from that variable —
so ``weir serve`` sets it (and wipes the directory) before any worker starts
(proxy/cli.py), and this module only asks the library which mode it is in.

The hot path pays for a dict lookup per label set and a few additions: it
adds to plain numbers kept per label set, and ``flush`` hands them to the
library on the refresh beat and before a scrape (a library child update
costs ~0.7 µs in multiprocess mode, a ``labels()`` lookup ~3.5 µs; a
request touches five to ten of them). Label values are bounded
so a hostile client cannot grow the series without limit: tenants are the
configured ones (a passthrough key counts as ``passthrough``), targets the
configured ones, routes Weir's own, and models are admitted only once an
upstream accepted them, up to ``max_models``; the rest is ``other``.

Gauges are not kept in step on the hot path: a lifespan task (``refresh``)
copies the components' state into them every ``refresh_s``, and a scrape
refreshes the worker that answers it. Multiprocess mode has no custom
collectors, so each gauge says how workers combine (``multiprocess_mode``).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE", "mark_worker_dead"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The OpenTelemetry GenAI semantic conventions' advisory buckets for
# gen_ai.server.time_to_first_token and gen_ai.server.request.duration.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# Weir's own time per request is ~0.1-1 ms on the benchmark; the buckets
# resolve that range and still show a stall of tens of milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# From "a slot was free" to "the scheduler's queue held it for a minute".
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
TOKEN_TYPES = ("input", "output", "cache_read", "cache_creation")
OTHER = "other"
PASSTHROUGH = "passthrough"
# Weir's routes; paths that carry an id are folded into one label each.
_ROUTES = ("/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/v1/chat/completions")
_ROUTE_PREFIXES = (("/v1/messages/batches", "/v1/messages/batches"), ("/v1/models/", "/v1/models/{id}"))


def multiprocess_dir() -> str | None:
    """The directory prometheus-client writes to, if it was imported in multiprocess mode."""
    if getattr(values.ValueClass, "_multiprocess", False):
        return os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return None


def mark_worker_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters keep counting in the sum)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


def worker_restarts(registry: CollectorRegistry | None = None) -> Counter:
    """The supervisor's counter; every worker declares it too, so it reads 0 before any restart."""
    return Counter("weir_worker_restarts", "Worker processes restarted after an unexpected exit.", registry=registry)


class _Counter:
    """A counter child's increments since the last flush."""

    __slots__ = ("labels", "n")

    def __init__(self, labels: Any) -> None:
        self.labels = labels  # () -> the prometheus child, looked up once, at the first flush
        self.n = 0.0


class _Histogram:
    """A histogram child's observations since the last flush, bucketed here."""

    __slots__ = ("labels", "bounds", "counts", "sum")

    def __init__(self, labels: Any, bounds: tuple[float, ...]) -> None:
        self.labels = labels
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v


class Metrics:
    """One app's metrics. ``request`` is called once per finished request.

    The hot path only adds to plain Python numbers (``_Counter``,
    ``_Histogram``); ``flush`` moves them into prometheus-client's values
    — an mmap write each in multiprocess mode, ~5x the cost of the addition,
    and a histogram observation is two of them — on the gauge refresh beat
    and before every scrape, so a scrape sees this worker's latest and the
    others' as of their last beat (``metrics.refresh_s``).
    """

    def __init__(self, *, tenants: Iterable[str], targets: Iterable[str], max_models: int = 200) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir()
        self._tenants = {t: t for t in tenants}
        self._targets = {t: t for t in targets}
        self._models: dict[str, str] = {}
        self._max_models = max_models
        r = self.registry
        self.requests = Counter("weir_requests", "Requests answered.", ["route", "tenant", "model", "target", "code", "cache", "kind"], registry=r)
        self.tokens = Counter("weir_tokens", "Tokens reported by the upstream.", ["tenant", "model", "target", "type"], registry=r)
        self.cost = Counter("weir_cost_usd", "Cost of the tokens at the price table's rates.", ["tenant", "model"], registry=r)
        self.attempts = Counter("weir_upstream_attempts", "Upstream attempts by outcome.", ["target", "outcome"], registry=r)
        self.shed = Counter("weir_shed", "Requests shed by a target's scheduler.", ["target", "reason"], registry=r)
        self.ratelimited = Counter("weir_ratelimit_rejections", "Requests refused by the tenant rate limiter.", ["tenant", "kind"], registry=r)
        self.restarts = worker_restarts(r)
        self.duration = Histogram("weir_request_duration_seconds", "Request duration, arrival to last byte.", ["route", "target", "stream"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("weir_time_to_first_token_seconds", "Arrival to the first response body byte.", ["target", "model"], buckets=TTFT_BUCKETS, registry=r)
        self.overhead = Histogram("weir_overhead_seconds", "Weir's own time: duration less the upstream's.", buckets=OVERHEAD_BUCKETS, registry=r)
        self.queue_wait = Histogram("weir_queue_wait_seconds", "Time waiting for a target's scheduler slot.", ["target", "priority"], buckets=QUEUE_BUCKETS, registry=r)
        self.inflight = Gauge("weir_inflight_requests", "Requests in flight.", registry=r, multiprocess_mode="livesum")
        # A target is as bad as its worst worker sees it; a key as unavailable as its worst worker says.
        self.breaker = Gauge("weir_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", ["target"], registry=r, multiprocess_mode="livemax")
        self.key_available = Gauge("weir_key_available", "1 when the key can take requests.", ["target", "key_id"], registry=r, multiprocess_mode="livemin")
        # L1 is per worker and bounded per worker (cache.l1_max_bytes), L2 is
        # one store every worker reports: the max is right for both.
        self.cache_bytes = Gauge("weir_cache_bytes", "Bytes held by the cache, per level.", ["level"], registry=r, multiprocess_mode="livemax")
        self.ledger_queue = Gauge("weir_ledger_queue_depth", "Ledger rows waiting to be written.", registry=r, multiprocess_mode="livesum")
        self.ledger_spooled = Gauge("weir_ledger_spooled_rows", "Ledger rows spooled to disk while the database was unreachable.", registry=r, multiprocess_mode="livesum")
        # Message Batch items (proxy/batches/runner.py): results are two values,
        # retry reasons the runner's fixed set of "not now" replies.
        self.batch_items = Counter("weir_batch_items", "Message Batch items whose result was written, by result.", ["result"], registry=r)
        self.batch_retries = Counter("weir_batch_retries", "Message Batch items released to run again later, by the reply that said not now.", ["reason"], registry=r)
        self.batch_running = Gauge("weir_batch_items_running", "Message Batch items running.", registry=r, multiprocess_mode="livesum")
        # Pending children, by their (raw) label values; all of them are flushed.
        self._counters: list[_Counter] = []
        self._histograms: list[_Histogram] = []
        self._req: dict[tuple[Any, ...], _Counter] = {}
        self._tok: dict[tuple[str, str, str], tuple[_Counter, _Counter, _Counter, _Counter]] = {}
        self._cost: dict[tuple[str, str], _Counter] = {}
        self._dur: dict[tuple[str, str, bool], _Histogram] = {}
        self._ttft: dict[tuple[str, str], _Histogram] = {}
        self._att: dict[tuple[str, str], _Counter] = {}
        self._shed: dict[tuple[str, str], _Counter] = {}
        self._rl: dict[tuple[str, str], _Counter] = {}
        self._qw: dict[tuple[str, str], _Histogram] = {}
        self._batch: dict[tuple[Counter, str], _Counter] = {}
        self._overhead = self._histogram(lambda: self.overhead, OVERHEAD_BUCKETS)
        self._codes = {c: str(c) for c in range(100, 600)}
        self._routes = {r: r for r in _ROUTES}

    def _counter(self, labels: Any) -> _Counter:
        c = _Counter(labels)
        self._counters.append(c)
        return c

    def _histogram(self, labels: Any, bounds: tuple[float, ...]) -> _Histogram:
        h = _Histogram(labels, bounds)
        self._histograms.append(h)
        return h

    # ----------------------------------------------------------- bounding

    def route(self, path: str) -> str:
        found = self._routes.get(path)
        if found is None:
            found = next((label for prefix, label in _ROUTE_PREFIXES if path.startswith(prefix)), OTHER)
        return found

    def tenant(self, tenant: str) -> str:
        return self._tenants.get(tenant, PASSTHROUGH)

    def target(self, label: str) -> str:
        """``name`` or ``name:model`` (a route's override) → the configured target name."""
        found = self._targets.get(label)
        if found is None:
            found = self._targets.get(label.partition(":")[0], OTHER if label else "")
        return found

    def model(self, model: str, accepted: bool = False) -> str:
        found = self._models.get(model)
        if found is None:
            if accepted and model and len(self._models) < self._max_models and len(model) <= 128:
                self._models[model] = found = model
            else:
                return OTHER
        return found

    # ---------------------------------------------------------- per request

    def request(
        self,
        *,
        route: str,
        tenant: str,
        model: str,
        target: str,
        code: int,
        cache: str,
        kind: str,
        stream: bool,
        duration_s: float,
        overhead_s: float,
        ttft_s: float | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_creation_tokens: int = 0,
        cost_usd: float = 0.0,
    ) -> None:
        """One finished request: a few additions to cached pending children."""
        route = self._routes.get(route) or self.route(route)
        t = self._tenants.get(tenant, PASSTHROUGH)
        m = self._models.get(model) or self.model(model, accepted=code < 400)
        tg = self._targets.get(target) or self.target(target)
        key = (route, t, m, tg, code, cache, kind)
        c = self._req.get(key)
        if c is None:
            labels = (route, t, m, tg, self._codes.get(code, OTHER), cache or "none", kind or "none")
            c = self._req[key] = self._counter(lambda: self.requests.labels(*labels))
        c.n += 1
        dkey = (route, tg, stream)
        h = self._dur.get(dkey)
        if h is None:
            h = self._dur[dkey] = self._histogram(lambda: self.duration.labels(route, tg, "true" if stream else "false"), DURATION_BUCKETS)
        h.observe(duration_s)
        self._overhead.observe(overhead_s if overhead_s > 0 else 0.0)
        if ttft_s is not None:
            tkey = (tg, m)
            h = self._ttft.get(tkey)
            if h is None:
                h = self._ttft[tkey] = self._histogram(lambda: self.ttft.labels(tg, m), TTFT_BUCKETS)
            h.observe(ttft_s)
        if input_tokens or output_tokens or cache_read_tokens or cache_creation_tokens:
            kkey = (t, m, tg)
            tok = self._tok.get(kkey)
            if tok is None:
                tok = self._tok[kkey] = tuple(self._counter(_child(self.tokens, t, m, tg, ty)) for ty in TOKEN_TYPES)  # type: ignore[assignment]
            tok[0].n += input_tokens
            tok[1].n += output_tokens
            tok[2].n += cache_read_tokens
            tok[3].n += cache_creation_tokens
        if cost_usd:
            ckey = (t, m)
            c = self._cost.get(ckey)
            if c is None:
                c = self._cost[ckey] = self._counter(lambda: self.cost.labels(t, m))
            c.n += cost_usd

    def attempt(self, target: str, outcome: str) -> None:
        """One upstream attempt: ``ok``, an HTTP status class, ``connect``, ``timeout``, ``reset``."""
        key = (target, outcome)
        c = self._att.get(key)
        if c is None:
            c = self._att[key] = self._counter(_child(self.attempts, self.target(target), outcome))
        c.n += 1

    def shed_one(self, target: str, reason: str) -> None:
        key = (target, reason)
        c = self._shed.get(key)
        if c is None:
            c = self._shed[key] = self._counter(_child(self.shed, self.target(target), reason))
        c.n += 1

    def ratelimit_rejection(self, tenant: str, kind: str) -> None:
        key = (tenant, kind)
        c = self._rl.get(key)
        if c is None:
            c = self._rl[key] = self._counter(_child(self.ratelimited, self.tenant(tenant), kind))
        c.n += 1

    def waited(self, target: str, priority: str, seconds: float) -> None:
        key = (target, priority)
        h = self._qw.get(key)
        if h is None:
            h = self._qw[key] = self._histogram(_child(self.queue_wait, self.target(target), priority), QUEUE_BUCKETS)
        h.observe(seconds)

    def batch_item(self, result: str) -> None:
        """A batch item's result written: ``succeeded`` or ``errored``."""
        self._batch_count(self.batch_items, result)

    def batch_retry(self, reason: str) -> None:
        """A batch item told "not now": the status (``429``, ``529``…) or ``no_reply``."""
        self._batch_count(self.batch_retries, reason)

    def _batch_count(self, metric: Counter, label: str) -> None:
        key = (metric, label)
        c = self._batch.get(key)
        if c is None:
            c = self._batch[key] = self._counter(_child(metric, label))
        c.n += 1

    def flush(self) -> None:
        """Move what the hot path added into prometheus-client's values (its files, in multiprocess mode).

        Only on the event loop's thread, where the hot path runs: the two
        never interleave.
        """
        for c in self._counters:
            if c.n:
                n, c.n = c.n, 0.0
                if not callable(c.labels):
                    c.labels.inc(n)
                else:
                    c.labels = c.labels()
                    c.labels.inc(n)
        for h in self._histograms:
            if h.sum or any(h.counts):
                counts, h.counts = h.counts, [0] * len(h.counts)
                total, h.sum = h.sum, 0.0
                if callable(h.labels):
                    h.labels = h.labels()
                # The child's own values, as Histogram.observe updates them: one per bucket and the sum.
                buckets = h.labels._buckets
                for i, n in enumerate(counts):
                    if n:
                        buckets[i].inc(n)
                h.labels._sum.inc(total)

    # --------------------------------------------------------------- gauges

    def set_gauges(
        self,
        *,
        inflight: int,
        breakers: Iterable[tuple[str, str]] = (),
        keys: Iterable[tuple[str, str, bool]] = (),
        cache_bytes: Iterable[tuple[str, int]] = (),
        ledger_queue: int | None = None,
        ledger_spooled: int | None = None,
        batch_running: int | None = None,
    ) -> None:
        """Copy the components' state in: (target, state), (target, key id, available), (level, bytes)."""
        self.inflight.set(inflight)
        for target, state in breakers:
            self.breaker.labels(self.target(target)).set(BREAKER_VALUES.get(state, 2))
        for target, key_id, available in keys:
            self.key_available.labels(self.target(target), key_id).set(1 if available else 0)
        for level, size in cache_bytes:
            self.cache_bytes.labels(level).set(size)
        if ledger_queue is not None:
            self.ledger_queue.set(ledger_queue)
        if ledger_spooled is not None:
            self.ledger_spooled.set(ledger_spooled)
        if batch_running is not None:
            self.batch_running.set(batch_running)

    # -------------------------------------------------------------- scrape

    def collect(self) -> list[Any]:
        """The metric families, every worker's merged.

        Blocking (it reads every worker's file): call ``flush`` on the event
        loop's thread first, then this from a thread.
        """
        if self.multiprocess_dir is None:
            return list(self.registry.collect())
        from prometheus_client import multiprocess

        return list(multiprocess.MultiProcessCollector(None, path=self.multiprocess_dir).collect())

    def render(self) -> bytes:
        """The text exposition: every worker's files merged, or this process's registry.

        Blocking, like ``collect``: ``flush`` first, on the event loop's thread.
        """
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return generate_latest(merged)


def _child(metric: Any, *labels: str) -> Callable[[], Any]:
    return lambda: metric.labels(*labels)
