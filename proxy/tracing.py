"""OpenTelemetry traces: one span per request, children for its queue wait,
cache lookup and each upstream attempt.

Optional (``pip install weir[otel]``) and configured the standard way, by
the ``OTEL_*`` variables: on when the SDK is installed, ``OTEL_SDK_DISABLED``
is not true, ``OTEL_TRACES_EXPORTER`` is not ``none`` and an OTLP endpoint
is set (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``); spans go out over OTLP/HTTP from the SDK's
BatchSpanProcessor, which exports from a thread of its own so the event loop
never waits on the collector. When off, nothing here is imported and the hot
path pays one ``is None`` test per hook.

The provider is this app's, not the process-global one: two apps in one
process (the tests) keep their spans apart. Spans parent through the
request's context: OpenTelemetry keeps the current span in a ContextVar and
trio copies the spawning task's context into child tasks, so the coalescer's
flight, started by its leader, runs inside the leader's span.

W3C ``traceparent`` always reaches the upstream. Off, the client's own header
passes untouched (proxy/headers.py forwards it). On, Weir's request span is a
child of the client's traceparent, and each upstream attempt carries its own
span's traceparent, so the provider's server span hangs under the attempt.

Attributes follow the GenAI semantic conventions (``gen_ai.operation.name``,
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens``/``output_tokens``) and HTTP's for the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["Tracing", "tracing_from_env", "client_trace_id"]

_TRACE_HEADERS = (b"traceparent", b"tracestate")


def client_trace_id(traceparent: bytes | None) -> str:
    """The trace id of a well-formed W3C ``traceparent`` (version 00), or ""."""
    if traceparent is None or len(traceparent) != 55 or traceparent[:3] != b"00-" or traceparent[35:36] != b"-":
        return ""
    trace_id = traceparent[3:35]
    try:
        if int(trace_id, 16) == 0:
            return ""
    except ValueError:
        return ""
    return trace_id.decode().lower()


def tracing_from_env(environ: Mapping[str, str]) -> Tracing | None:
    """A Tracing when the ``OTEL_*`` variables ask for one and the extra is installed."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter_name in ("none", ""):
        return None
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not endpoint and not base:
        return None
    if not endpoint:
        endpoint = base.rstrip("/") + "/v1/traces"  # the OTLP/HTTP spec's signal path
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        import logging

        logging.getLogger("weir").warning("OTEL_* variables ask for traces but the otel extra is not installed: pip install 'weir[otel]'")
        return None
    return Tracing(OTLPSpanExporter(endpoint=endpoint), environ=environ)


class Tracing:
    """This app's tracer. ``exporter`` is any SpanExporter (OTLP, or in-memory in tests)."""

    def __init__(self, exporter: Any, *, environ: Mapping[str, str] | None = None, batch: bool = True) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        env = environ or {}
        attrs = {"service.name": env.get("OTEL_SERVICE_NAME") or "weir"}
        self.provider = TracerProvider(resource=Resource.create(attrs))
        self.provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("weir")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._internal = trace.SpanKind.INTERNAL
        from opentelemetry.trace import Status, StatusCode

        self._error_status = Status(StatusCode.ERROR)

    # ------------------------------------------------------------ request

    def start_request(self, method: str, path: str, headers: Mapping[bytes, bytes], request_id: str) -> Any:
        """The request's span, a child of the client's ``traceparent`` when it sent one."""
        carrier = {}
        tp = headers.get(b"traceparent")
        if tp is not None:
            carrier["traceparent"] = tp.decode("latin-1")
            ts = headers.get(b"tracestate")
            if ts is not None:
                carrier["tracestate"] = ts.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        return self.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=self._server,
            attributes={"http.request.method": method, "url.path": path, "weir.request_id": request_id},
        )

    @contextmanager
    def current(self, span: Any) -> Iterator[None]:
        """Make ``span`` the parent of every span started below (this task and its children)."""
        with self._trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield

    def trace_id(self, span: Any) -> str:
        return format(span.get_span_context().trace_id, "032x")

    def finish_request(
        self,
        span: Any,
        *,
        operation: str,
        provider: str,
        request_model: str,
        response_model: str,
        status: int,
        error: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        target: str = "",
        cache: str = "",
    ) -> None:
        if operation:
            span.update_name(f"{operation} {request_model}" if request_model else operation)
            span.set_attribute("gen_ai.operation.name", operation)
        if provider:
            span.set_attribute("gen_ai.provider.name", provider)
        if request_model:
            span.set_attribute("gen_ai.request.model", request_model)
        if response_model:
            span.set_attribute("gen_ai.response.model", response_model)
        if input_tokens or output_tokens:
            span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        if status:
            span.set_attribute("http.response.status_code", status)
        if target:
            span.set_attribute("weir.target", target)
        if cache:
            span.set_attribute("weir.cache", cache)
        if status >= 500 or error:
            span.set_attribute("error.type", error or str(status))
            span.set_status(self._error_status)
        span.end()

    def link(self, span: Any, leader: Any) -> None:
        """A coalesced follower's span points at the leader's, whose flight answered it."""
        span.add_link(leader.get_span_context(), {"weir.link": "coalesced_leader"})

    # ------------------------------------------------------------ children

    @contextmanager
    def child(self, name: str, attributes: dict[str, Any] | None = None, client: bool = False) -> Iterator[Any]:
        """A span under the current one, ended when the block exits (an exception marks it an error)."""
        with self.tracer.start_as_current_span(name, kind=self._client if client else self._internal, attributes=attributes) as span:
            yield span

    def outgoing(self, request: Any, span: Any) -> Any:
        """``request`` (an UpstreamRequest) carrying ``span``'s traceparent instead of the client's."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        headers = [(n, v) for n, v in request.headers if n not in _TRACE_HEADERS]
        headers += [(k.encode(), v.encode("latin-1")) for k, v in carrier.items()]
        return dataclasses.replace(request, headers=headers)

    def shutdown(self) -> None:
        """Flush what is queued and stop the exporter thread (blocking: call from a thread)."""
        self.provider.shutdown()
