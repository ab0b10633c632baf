"""Hypercorn's settings from Weir's: ``hypercorn -c python:proxy.hypercorn_conf.config proxy.asgi:app``.

A TOML file for Hypercorn fixes the bind, so ``WEIR_SERVER__PORT`` and
``WEIR_SERVER__HOST`` were silently ignored under plain Hypercorn. Here the
bind, the workers, the drain (``graceful_timeout``) and the keep-alive come
from the same ``WEIR_CONFIG`` / ``WEIR_*`` settings the app reads, through
``proxy.cli.hypercorn_settings`` — the values ``weir serve`` uses. Hypercorn's
own flags (``--bind``, ``--workers``…) still override them.

Hypercorn reads every public attribute of the object it is given, so
``config`` is a plain namespace holding only settings, built when Hypercorn
asks for it.
"""

from types import SimpleNamespace
from typing import Any


def __getattr__(name: str) -> Any:
    if name != "config":
        raise AttributeError(name)
    from .cli import hypercorn_settings
    from .settings import load_settings

    return SimpleNamespace(**hypercorn_settings(load_settings()))
