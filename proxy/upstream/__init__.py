"""Upstream adapters: one interface, ``Target.open(request) → UpstreamResponse``.

Anthropic passthrough forwards bytes; the OpenAI-compatible adapter
translates. Routing, retries and breakers wrap this interface and never
reach inside it.
"""

from .base import UpstreamRequest, UpstreamResponse, UpstreamError
from .target import Target

__all__ = ["UpstreamRequest", "UpstreamResponse", "UpstreamError", "Target"]
