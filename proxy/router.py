"""route: a requested model → an ordered chain of targets, tried until one answers.

Per target (a ``Lane``): a circuit breaker, a key pool and the fair
scheduler. For each target of the chain, in order:

1. breaker open → skip it at once, without connecting;
2. every key cooling (429) or disabled (a 401/403 its probe confirmed) →
   remember why, move on;
3. wait for a scheduler slot (the only queue in front of the HTTP client:
   a pool with waiters of its own collapses, docs/ARCHITECTURE.md);
4. send through the adapter (``proxy.upstream.adapters``) and classify what
   came back: connect error, timeout, reset before the head, or a status;
5. tell the breaker and the key pool (the pool on every response, successes
   included, so it learns each key's remaining capacity), then ask the one
   retry policy (``proxy.retry``): retry here after a jittered delay, fail
   over to the next target, or hand the upstream's answer to the client.

A 429 in passthrough mode (the client's own key) is relayed at once, not
slept on: the client's SDK honours its retry-after, and two layers waiting
in turn would double the wait. A 429 on one key while another key of the same pool has capacity is retried
at once on that other key: it says the key is spent, not the target, so
sleeping its retry-after would only delay a request that can go now. A
refused connection fails over at once when another target exists: it is a
certain, instant signal, and retrying the same closed port only adds the
backoff to the failover time.

Nothing is retried once the response head is yielded: from then on the bytes
belong to the client. Every breaker permit, key lease and scheduler slot ends
in a ``finally`` (or in the exit stack handed to the caller with the
response), so a cancelled request gives all of them back.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import random as _random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import trio

from .breaker import CircuitBreaker
from .context import Deadlines, RequestContext, Served
from .errors import ProxyError, is_anthropic_error, upstream_failure
from .keypool import KeyPool, Lease
from .metrics import Metrics
from .tracing import Tracing
from .retry import Decision, GiveUp, RetryPolicy, retry_after_from_headers
from .retry import Outcome as AttemptOutcome
from .scheduler import FifoSemaphoreScheduler, Overloaded, PaceBudget, Scheduler
from .settings import Settings
from .upstream import Target, UpstreamError, UpstreamRequest, UpstreamResponse
from .upstream.adapters import prepare, wrap
from .upstream.base import ERROR_BODY_LIMIT, read_up_to
from .usage import estimate_input_tokens

__all__ = ["Router", "Lane"]

_GLOB = frozenset("*?[")
# Paths routed by the requested model; every other API path is an endpoint of Anthropic's own.
_BY_MODEL = frozenset(("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions"))

# How much a failure explains the final answer when every target failed,
# most telling first: an upstream's own error response, then "your keys are
# cooling" (429 + when to come back), shed (529), unreachable (502/504),
# every key disabled (503), and last "we skipped it: its breaker is open".
_RANK_RESPONSE, _RANK_COOLING, _RANK_SHED, _RANK_UNREACHABLE, _RANK_DISABLED, _RANK_BREAKER = range(6)


class Lane:
    """One target and the state Weir keeps about it."""

    def __init__(self, target: Target, *, breaker: CircuitBreaker, keys: KeyPool | None, scheduler: Scheduler | FifoSemaphoreScheduler) -> None:
        self.target = target
        self.name = target.name
        self.breaker = breaker
        self.keys = keys
        self.scheduler = scheduler

    def snapshot(self, now: float) -> dict[str, Any]:
        stats = self.scheduler.stats()
        if not isinstance(stats, dict):
            import msgspec

            stats = msgspec.to_builtins(stats)
        return {
            "name": self.name,
            "kind": self.target.kind,
            "url": self.target.url,
            "model": self.target.settings.model,
            "max_connections": self.target.settings.max_connections,
            "breaker": self.breaker.snapshot(now),
            "keys": self.keys.snapshot(now) if self.keys is not None else [],
            "scheduler": stats,
        }


class _Failures:
    """The most telling failure so far, for the answer when every target failed."""

    def __init__(self) -> None:
        self.rank = math.inf
        self.error: ProxyError | None = None
        self.cooling_s: float | None = None

    def note(self, rank: int, error: ProxyError) -> None:
        if rank <= self.rank:
            self.rank, self.error = rank, error

    def note_cooling(self, lane: str, seconds: float) -> None:
        if self.cooling_s is None or seconds < self.cooling_s:
            self.cooling_s = seconds
        wait = str(max(1, math.ceil(self.cooling_s))).encode()
        self.note(
            _RANK_COOLING,
            ProxyError(429, f"every key of {lane} is rate limited; retry in {self.cooling_s:.1f} s", "rate_limit_error", [(b"retry-after", wait)]),
        )

    def final(self) -> ProxyError:
        if self.error is None:
            return ProxyError(502, "no upstream target could take the request", "api_error")
        return self.error


class Router:
    def __init__(
        self,
        settings: Settings,
        targets: list[Target],
        *,
        random: Callable[[], float] = _random.random,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.targets = targets
        breaker_config = settings.breaker
        self.retry = RetryPolicy(settings.retry, random=random)
        s = settings.scheduler
        # A client key's weight applies unless scheduler.weights names its tenant.
        weights = {ck.tenant: ck.weight for ck in settings.auth.client_keys}
        weights.update(s.weights)
        self.lanes: list[Lane] = []
        for t in targets:
            n = t.settings.max_connections
            if s.policy == "fifo":
                sched: Scheduler | FifoSemaphoreScheduler = FifoSemaphoreScheduler(capacity=n, max_queue=s.max_queue)
            else:
                u = t.settings
                budget = None
                if u.requests_per_minute or u.tokens_per_minute:
                    # The provider's quota: requests beyond it wait here, spaced out.
                    budget = PaceBudget(requests_per_minute=u.requests_per_minute, tokens_per_minute=u.tokens_per_minute, burst=u.burst)
                sched = Scheduler(
                    capacity=n,
                    max_queue=s.max_queue,
                    weights=weights,
                    starvation_limit=s.starvation_limit,
                    max_queue_per_tenant=s.max_queue_per_tenant or None,
                    budget=budget,
                )
            keys = KeyPool(t.keys, name=t.name) if t.keys else None
            self.lanes.append(Lane(t, breaker=CircuitBreaker(breaker_config), keys=keys, scheduler=sched))
        self._by_name = {lane.name: lane for lane in self.lanes}

    # ------------------------------------------------------------ routing

    def lane(self, name: str) -> Lane | None:
        return self._by_name.get(name)

    def resolve(self, model: str, kind: str = "main") -> list[tuple[Lane, str]]:
        """The ordered chain for ``model`` and request ``kind`` (proxy/kinds.py):
        (lane, model name to send, "" = the client's)."""
        for route in self.settings.routes:
            if route.kind and route.kind != kind:
                continue
            m = route.match
            if (fnmatch.fnmatchcase(model, m) if _GLOB.intersection(m) else model == m):
                chain = []
                for entry in route.targets:
                    name, _, override = entry.partition(":")
                    lane = self._by_name.get(name)
                    if lane is not None:
                        chain.append((lane, override or lane.target.settings.model))
                if chain:
                    return chain
        first = self.lanes[0]
        return [(first, first.target.settings.model)]

    def resolve_request(self, req: UpstreamRequest, kind: str = "main") -> list[tuple[Lane, str]]:
        """The chain for ``req``: by model and kind for a generation, and for an
        endpoint only Anthropic has (batches, files, skills…) its Anthropic-kind
        targets in configuration order — or, with none, the model's chain,
        whose target answers 404 for what it has no equivalent of. A request
        pinned to a target (``req.target``) goes there or nowhere."""
        if req.target:
            lane = self._by_name.get(req.target)
            return [(lane, "")] if lane is not None else []
        if req.path in _BY_MODEL or req.path.startswith("/v1/models"):
            return self.resolve(req.model, kind)
        chain = [(lane, "") for lane in self.lanes if lane.target.kind == "anthropic"]
        return chain or self.resolve(req.model, kind)

    def usable(self, now: float) -> bool:
        """False when every target's breaker is open: /ready says 503."""
        return any(lane.breaker.state(now).value != "open" for lane in self.lanes)

    # ------------------------------------------------------------ the call

    def open(self, req: UpstreamRequest, ctx: RequestContext) -> _Call:
        """The upstream response once its head arrived (any status), as an
        async context manager.

        Raises ``ProxyError`` when no target could produce a response head.
        Runs inside the caller's deadline scope. The response's ``served``
        says who answered; its ``verdict`` is set when the block ends.
        """
        return _Call(self, req, ctx)

    async def _acquire(self, req: UpstreamRequest, ctx: RequestContext, held: AsyncExitStack) -> UpstreamResponse:
        d = ctx.deadlines
        head_deadline = min(trio.current_time() + d.first_byte_s, d.total)
        chain = self.resolve_request(req, ctx.kind)
        failures = _Failures()
        served = Served()
        for i, (lane, model) in enumerate(chain):
            served.failover_index = i
            resp = await self._try_lane(lane, model, req, ctx, served, head_deadline, held, failures, last=i == len(chain) - 1)
            if resp is not None:
                return resp
        err = failures.final()
        err.served = served
        raise err

    async def _try_lane(
        self,
        lane: Lane,
        model: str,
        req: UpstreamRequest,
        ctx: RequestContext,
        served: Served,
        head_deadline: float,
        held: AsyncExitStack,
        failures: _Failures,
        *,
        last: bool,
    ) -> UpstreamResponse | None:
        """One target: its attempts and retries. None means "try the next target"."""
        label = f"{lane.name}:{model}" if model else lane.name
        leg = prepare(req, kind=lane.target.kind, model=model)  # ProxyError(400): no target can help
        if leg.local is not None:
            # Answered by the adapter itself (count_tokens on a target without a counter).
            served.target, served.model = label, model
            return _Routed(leg.local, served, ctx.deadlines, head_deadline)
        # The target's own keys win whenever it has some (the quick start's
        # --upstream-key-env with no client keys); the client's credentials are
        # forwarded only to a target that has none.
        pool = lane.keys
        if pool is not None and ctx.passthrough:
            # A copy: ``req`` is shared with the other targets of the chain (and a flight's followers).
            leg.request = dataclasses.replace(leg.request, headers=[(n, v) for n, v in leg.request.headers if n not in (b"x-api-key", b"authorization")])
        attempt = 0
        key_switches = 0
        while True:
            now = trio.current_time()
            permit = lane.breaker.allow(now)
            if permit is None:
                snap = lane.breaker.snapshot(now)
                wait = max(1, math.ceil((snap["next_probe_at"] or now) - now))  # type: ignore[operator]
                failures.note(_RANK_BREAKER, ProxyError(503, f"upstream {lane.name} is failing; its circuit breaker is open", "api_error", [(b"retry-after", str(wait).encode())]))
                return None
            lease: Lease | None = None
            delay = 0.0
            try:
                credentials: list[tuple[bytes, bytes]] = []
                if pool is not None:
                    lease = pool.pick(now)
                    if lease is None:
                        soonest = pool.soonest_available(now)
                        if soonest is None:
                            failures.note(_RANK_DISABLED, ProxyError(503, f"every API key of upstream {lane.name} is disabled", "api_error"))
                        else:
                            failures.note_cooling(lane.name, soonest)
                        return None
                    credentials = lane.target.credentials(lease.secret)
                async with AsyncExitStack() as stack:
                    queued = time.perf_counter()
                    try:
                        slot = lane.scheduler.slot(tenant=ctx.tenant, priority=ctx.priority, deadline=head_deadline, tokens=estimate_input_tokens(leg.request.body))
                        if self.tracing is None:
                            ticket = await stack.enter_async_context(slot)
                        else:
                            with self.tracing.child("weir.queue_wait", {"weir.target": lane.name, "weir.priority": ctx.priority}):
                                ticket = await stack.enter_async_context(slot)
                    except Overloaded as exc:
                        if self.metrics is not None:
                            self.metrics.shed_one(lane.name, exc.reason)
                        failures.note(_RANK_SHED, exc)
                        return None
                    served.queue_wait_s = time.perf_counter() - queued
                    if self.metrics is not None:
                        self.metrics.waited(lane.name, ctx.priority, served.queue_wait_s)
                    served.target, served.model = label, model
                    served.key_id = lease.key_id if lease is not None else None
                    served.dropped = leg.dropped
                    served.attempts += 1
                    request = leg.request
                    span = None
                    if self.tracing is not None:
                        # Ended with the attempt: when the head came back, or failed to.
                        span = self.tracing.tracer.start_span(
                            f"chat {model or req.model}",
                            kind=self.tracing._client,
                            attributes={"gen_ai.operation.name": "chat", "gen_ai.provider.name": lane.target.kind, "gen_ai.request.model": model or req.model, "weir.target": lane.name, "weir.attempt": attempt},
                        )
                        request = self.tracing.outgoing(request, span)
                    error: UpstreamError | None = None
                    resp: UpstreamResponse | None = None
                    # The caller's cancel scope carries the first-byte deadline;
                    # a scope of our own only when a per-try budget is shorter.
                    per_try = self.settings.deadlines.per_try_first_byte_s
                    try_expired = False
                    try:
                        if per_try > 0 and not last:
                            with trio.move_on_at(min(head_deadline, trio.current_time() + per_try)) as try_scope:
                                raw = await stack.enter_async_context(lane.target.open(request, credentials=credentials))
                                resp = await wrap(leg, raw)
                            if try_scope.cancelled_caught:
                                try_expired = True
                                error = UpstreamError("timeout", f"no response head within the per-try budget of {per_try:g} s")
                        else:
                            raw = await stack.enter_async_context(lane.target.open(request, credentials=credentials))
                            resp = await wrap(leg, raw)
                    except UpstreamError as exc:
                        error = exc
                    except trio.Cancelled:
                        if trio.current_time() >= head_deadline:
                            # The head did not come in time: the target's fault
                            # (a client hanging up is not). The caller answers 504.
                            lane.breaker.record(permit, False, trio.current_time())
                            permit = None
                            served.verdict = "failure"
                            if self.metrics is not None:
                                self.metrics.attempt(lane.name, "timeout")
                        if span is not None:
                            _end_attempt(span, UpstreamError("timeout", "cancelled"), None)
                        raise
                    now = trio.current_time()
                    if self.metrics is not None:
                        self.metrics.attempt(lane.name, _attempt_outcome(error, resp))
                    if span is not None:
                        _end_attempt(span, error, resp)
                    if error is not None and error.kind == "refused":
                        # Weir refused to send it: no verdict on the target or
                        # the key (the finally below hands both back), and
                        # every target would refuse the same bytes.
                        raise ProxyError(400, f"the request cannot be forwarded: {error.message}", "invalid_request_error")
                    if error is not None or resp is None:
                        assert error is not None
                        lane.breaker.record(permit, False, now)
                        permit = None
                        kind = error.kind if error.kind in ("connect", "timeout", "reset") else "reset"
                        outcome = AttemptOutcome(kind)  # type: ignore[arg-type]
                        failures.note(_RANK_UNREACHABLE, upstream_failure(error, label))
                        if (kind == "connect" or try_expired) and not last:
                            return None  # a refused or stuck target: the next one, now
                    else:
                        status = resp.status
                        # Decoded only when read: the common case (a success
                        # with no key pool) never needs it.
                        headers = _header_map(resp.headers) if lease is not None or status >= 400 else {}
                        key_revoked = False
                        if lease is not None:
                            pool.observe(lease, status, headers, now, wallclock=time.time())  # type: ignore[union-attr]
                            if status in (401, 403) and pool.begin_probe(lease.key_id):  # type: ignore[union-attr]
                                key_revoked = await _confirm_key(lane, pool, lease)  # type: ignore[arg-type]
                                now = trio.current_time()
                        # The provider budget's AIMD: a 429 lowers it, a success wins some back.
                        lane.scheduler.report(ticket, status, retry_after_from_headers(headers, time.time()) if status == 429 else None)
                        if status < 400:
                            # A good head is not yet a good answer: the stream
                            # behind it may still break. Judged when it closes.
                            routed = _Routed(resp, served, ctx.deadlines, head_deadline)
                            held.push_async_exit(_judge(lane, permit, routed))
                            permit = None
                            await held.enter_async_context(stack.pop_all())
                            return routed
                        # 5xx and 529 blame the target; 4xx (429 included) blame the request or a key.
                        lane.breaker.record(permit, status < 500, now)
                        served.verdict = "success" if status < 500 else "failure"
                        permit = None
                        if (status == 429 or key_revoked) and pool is not None and key_switches < len(pool.key_ids) - 1 and pool.soonest_available(now) == 0.0:
                            key_switches += 1  # the key is spent or revoked, another one has capacity: use it now
                            continue
                        should = headers.get("x-should-retry")
                        outcome = AttemptOutcome(
                            "status",
                            status,
                            retry_after_from_headers(headers, time.time()),
                            None if should is None else should.lower() == "true",
                        )
                        if status == 429 and pool is None:
                            # The client's own key is spent: its SDK honours retry-after
                            # itself, and waiting here too would stack the two waits.
                            decision: Decision = GiveUp("not_retryable", failover=True)
                        else:
                            decision = self.retry.decide(attempt=attempt, outcome=outcome, now=now, deadline=head_deadline)
                        if isinstance(decision, GiveUp) and (not decision.failover or last):
                            await held.enter_async_context(stack.pop_all())
                            return _Routed(resp, served, ctx.deadlines, head_deadline)
                        if isinstance(decision, GiveUp):
                            failures.note(_RANK_RESPONSE, await _error_of(resp))
                            return None
                        delay = decision.delay_s
                        attempt += 1
                    if error is not None:
                        decision = self.retry.decide(attempt=attempt, outcome=outcome, now=now, deadline=head_deadline)
                        if isinstance(decision, GiveUp):
                            return None
                        delay = decision.delay_s
                        attempt += 1
            finally:
                now = trio.current_time()
                if permit is not None:
                    lane.breaker.release(permit, now)
                if lease is not None and pool is not None:
                    pool.release(lease)
            # The slot is free and the response closed before we sleep.
            if delay > 0:
                await trio.sleep(delay)


class _Call:
    """``Router.open``'s context manager: what the attempt holds (the slot,
    the connection, the breaker's permit) sits on one exit stack, unwound
    when the block ends. A class rather than ``@asynccontextmanager``: the
    generator machinery cost ~2.6 µs a layer on every request."""

    __slots__ = ("_router", "_req", "_ctx", "_held")

    def __init__(self, router: Router, req: UpstreamRequest, ctx: RequestContext) -> None:
        self._router, self._req, self._ctx = router, req, ctx
        self._held = AsyncExitStack()

    async def __aenter__(self) -> UpstreamResponse:
        held = self._held
        try:
            return await self._router._acquire(self._req, self._ctx, held)
        except BaseException as exc:
            await held.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        return await self._held.__aexit__(exc_type, exc, tb)


class _Routed:
    """The response a target gave, as the router hands it up.

    It watches its own body, so the breaker's verdict needs nothing from the
    layers above: a body that broke (``UpstreamError``) is a failure, a body
    read to its end a success; a cancellation is a failure only when the
    body had stalled — no byte for ``idle_s`` (before the first byte, past
    the first-byte deadline), or the total deadline passed. That holds
    whoever reads the body: a client's relay, or a coalesced flight that
    has no client of its own.
    """

    __slots__ = ("status", "headers", "served", "_raw", "_deadlines", "_head_deadline", "_last", "ended")

    def __init__(self, raw: UpstreamResponse, served: Served, deadlines: Deadlines, head_deadline: float) -> None:
        self.status = raw.status
        self.headers = raw.headers
        self.served = served
        self._raw = raw
        self._deadlines = deadlines
        self._head_deadline = head_deadline
        self._last: float | None = None  # trio time of the last body read
        self.ended: bool | None = None  # True: read to the end; False: broke

    async def aiter(self) -> AsyncIterator[bytes]:
        now = trio.current_time
        try:
            async for chunk in self._raw.aiter():
                self._last = now()
                yield chunk
        except UpstreamError:
            self.ended = False
            raise
        self.ended = True

    async def read(self, limit: int) -> bytes:
        return await read_up_to(self.aiter(), limit)

    def stalled(self, now: float) -> bool:
        if now >= self._deadlines.total:
            return True
        if self._last is None:
            return now >= self._head_deadline
        return now >= self._last + self._deadlines.idle_s


def _judge(lane: Lane, permit: Any, resp: _Routed) -> Callable[..., Any]:
    """The breaker's verdict on a good head's response, taken when it closes."""

    async def judge(exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        now = trio.current_time()
        if resp.ended is False or (exc_type is not None and issubclass(exc_type, UpstreamError)):
            ok: bool | None = False
        elif resp.ended or exc_type is None:
            ok = True
        elif issubclass(exc_type, trio.Cancelled) and resp.stalled(now):
            ok = False
        else:
            ok = None  # the client left, or a flight lost its last subscriber: no verdict
        if ok is None:
            lane.breaker.release(permit, now)
            resp.served.verdict = "released"
        else:
            lane.breaker.record(permit, ok, now)
            resp.served.verdict = "success" if ok else "failure"
        return False  # never swallow what ended the body

    return judge


def _attempt_outcome(error: UpstreamError | None, resp: UpstreamResponse | None) -> str:
    """A closed set for the attempts counter: ``ok``, ``4xx``/``429``/``5xx``/``529``, or the failure kind."""
    if error is not None:
        return error.kind if error.kind in ("connect", "timeout", "reset") else "reset"
    status = resp.status if resp is not None else 0
    if status < 400:
        return "ok"
    if status in (429, 529):
        return str(status)
    return "4xx" if status < 500 else "5xx"


def _end_attempt(span: Any, error: UpstreamError | None, resp: UpstreamResponse | None) -> None:
    if resp is not None:
        span.set_attribute("http.response.status_code", resp.status)
    if error is not None or (resp is not None and resp.status >= 500):
        span.set_attribute("error.type", error.kind if error is not None else str(resp.status))  # type: ignore[union-attr]
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR))
    span.end()


# A probe is one small GET; past this, call it unanswered and keep the key.
_PROBE_TIMEOUT_S = 10.0


async def _confirm_key(lane: Lane, pool: KeyPool, lease: Lease) -> bool:
    """Probe a key that just got a 401/403; True when the probe was refused the same way.

    The key pool decides (``end_probe``); a probe that gets no answer, or is
    cancelled with its request, leaves the key in rotation.
    """
    status: int | None = None
    try:
        with trio.move_on_after(_PROBE_TIMEOUT_S):
            status = await lane.target.probe_key(lease.secret)
    except UpstreamError:
        status = None
    finally:
        pool.end_probe(lease.key_id, status, trio.current_time())
    return status in (401, 403)


def _header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {n.decode("latin-1"): v.decode("latin-1") for n, v in headers}


async def _error_of(resp: UpstreamResponse) -> ProxyError:
    """An upstream error response we will not relay (a later target may do better), kept as an answer."""
    body = await resp.read(ERROR_BODY_LIMIT)
    headers = [(n, v) for n, v in resp.headers if n in (b"retry-after", b"retry-after-ms", b"request-id", b"x-request-id")]
    if is_anthropic_error(body):
        import json

        err = json.loads(body)["error"]
        return ProxyError(resp.status, err["message"], err["type"], headers)
    snippet = body[:200].decode("utf-8", "replace").strip()
    return ProxyError(resp.status, f"upstream returned HTTP {resp.status}: {snippet}" if snippet else f"upstream returned HTTP {resp.status}", None, headers)
