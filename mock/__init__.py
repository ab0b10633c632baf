"""The mock upstream: Anthropic Messages and OpenAI chat completions, faults on demand.

A fixture for the tests, the quick start's upstream and the far end of the
benchmark. It is its own package, beside ``proxy/`` and ``cache/``, because
Weir never depends on it: ``weir serve`` (``proxy/cli.py``) starts it only when
no upstream is configured and hands Weir its URL as an ordinary upstream.
"""

from . import upstream as _upstream
from .upstream import *  # noqa: F403 - the package is its one module's public names

__all__ = _upstream.__all__
