"""``server.data_dir``: the one directory every file Weir writes lives under.

Before it existed, the SQLite cache and its ``-wal``/``-shm`` files landed in
whatever directory Weir happened to start from. Now each writer takes its
path from here (the SQLite L2 is ``<data_dir>/cache.db``), so an operator
backs up, mounts or wipes one directory.

The default is where a service's state goes on Linux, and needs nothing to
exist beforehand, so ``weir serve`` works on a fresh machine:

1. ``$STATE_DIRECTORY`` — systemd sets it for a unit with ``StateDirectory=``
   (``/var/lib/<name>``, owned by the service user); the first entry if it
   lists several.
2. ``$XDG_STATE_HOME/weir`` — the XDG Base Directory spec's place for state
   that persists across restarts but is not worth backing up as documents.
3. ``~/.local/state/weir`` — the spec's default for ``XDG_STATE_HOME``.

A relative ``data_dir`` is taken from the directory Weir starts in and made
absolute at load, so worker processes agree on it. The entry points (``weir
serve``, ``proxy.asgi``) create it before their event loop starts, so no
component blocks trio on it and each may assume it exists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["DataDirError", "default_data_dir", "prepare_data_dir", "resolve_data_dir"]


class DataDirError(Exception):
    """The data directory cannot be used; the message names it and why."""


def default_data_dir(environ: Mapping[str, str]) -> str:
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    xdg = environ.get("XDG_STATE_HOME", "")
    # The spec says a relative XDG_STATE_HOME is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "weir")
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "weir")


def resolve_data_dir(configured: str, environ: Mapping[str, str]) -> str:
    path = configured or default_data_dir(environ)
    return os.path.abspath(os.path.expanduser(path))


def prepare_data_dir(path: str) -> None:
    """Create the directory (owner-only: it holds cached prompts and replies)
    and check that Weir can write there. An existing directory keeps its mode:
    the operator chose it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)  # a file in the way: "File exists"
    except OSError as exc:
        raise DataDirError(f"cannot create server.data_dir {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataDirError(f"server.data_dir {path} is not writable by this user")
