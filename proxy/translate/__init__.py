"""Anthropic ↔ OpenAI chat-completions translation, sans-IO.

Requests, whole responses and streams, both ways. Nothing here touches a
socket or a clock: the upstream adapter (``proxy/upstream/``) and the
``/v1/chat/completions`` ingress feed decoded JSON in and write out what comes
back. The stream grammars both directions must keep are checked by the
tests' ``tests/validate.py``.
"""

from ._common import TranslationError
from .to_anthropic import (
    DEFAULT_MAX_TOKENS,
    AnthropicStreamToOpenAI,
    anthropic_response_to_openai,
    map_stop_reason,
    openai_request_to_anthropic,
)
from .inline_tags import InlineTagParser
from .to_openai import (
    OpenAIRequest,
    OpenAIStreamToAnthropic,
    anthropic_request_to_openai,
    map_finish_reason,
    openai_response_to_anthropic,
)

__all__ = [
    "TranslationError",
    "anthropic_request_to_openai",
    "OpenAIRequest",
    "InlineTagParser",
    "openai_response_to_anthropic",
    "OpenAIStreamToAnthropic",
    "map_finish_reason",
    "openai_request_to_anthropic",
    "anthropic_response_to_openai",
    "AnthropicStreamToOpenAI",
    "map_stop_reason",
    "DEFAULT_MAX_TOKENS",
]
