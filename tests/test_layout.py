"""The layout keeps its promises: the policy cores are sans-IO, the shells are thin.

docs/ARCHITECTURE.md lists which modules are pure policy (no sockets, no
clock of their own, no trio) and which are trio shells around a pure core.
These tests make that table true: a core that starts importing trio, or a
pure class that starts calling it, fails here.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

# Whole modules with no trio in them: importing one must not import trio.
PURE_MODULES = [
    "proxy.breaker",
    "proxy.retry",
    "proxy.keypool",
    "proxy.usage",
    "proxy.sse",
    "proxy.translate",
    "proxy.kinds",
    "proxy.local_answers",
    # What the ledger's and the batches' stores share: connections, migrations.
    "proxy.sqlite_conns",
    "proxy.pg_conns",
    "proxy.migrations",
    # The ledger but its trio shell (proxy/ledger/writer.py, service.py).
    "proxy.ledger.row",
    "proxy.ledger.capture",
    "proxy.ledger.prices",
    "proxy.ledger.store",
    "proxy.ledger.spool",
    "proxy.ledger.query",
    "proxy.ledger.sqlite",
    "proxy.ledger.postgres",
    # Message Batches but their trio shell (the runner, the HTTP handlers).
    "proxy.batches.model",
    "proxy.batches.store",
    "proxy.batches.sqlite",
    "proxy.batches.postgres",
]

# Pure cores that share a module with their trio shell (proxy/scheduler.py is
# the house example): the class itself must never touch trio.
PURE_CLASSES = [
    ("proxy.scheduler", "FairQueue"),
    ("proxy.scheduler", "Ticket"),
    ("proxy.scheduler", "PaceBudget"),
    ("proxy.ratelimit", "TokenBucket"),
    ("proxy.batches.passthrough", "ResultLines"),
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_core_module_imports_no_trio(module: str) -> None:
    probe = f"import sys, {module}; sys.exit(1 if 'trio' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True)
    assert done.returncode == 0, f"{module} imports trio: {done.stderr.decode()[-300:]}"


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


@pytest.mark.parametrize(("module", "cls"), PURE_CLASSES)
def test_pure_core_class_never_calls_trio(module: str, cls: str) -> None:
    klass = getattr(__import__(module, fromlist=[cls]), cls)
    used: set[str] = set()
    for value in vars(klass).values():
        func = getattr(value, "__func__", value)
        func = getattr(func, "fget", func)  # properties
        code = getattr(func, "__code__", None)
        if code is not None:
            used |= _names(code)
    assert "trio" not in used, f"{module}.{cls} reaches for trio; pass `now` in instead"


def test_the_probe_would_see_trio() -> None:
    """The module probe can fail: a module that does import trio is caught."""
    probe = "import sys, proxy.scheduler; sys.exit(1 if 'trio' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 1


def _imports(path: str) -> set[str]:
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / path).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_admin_app_does_not_import_the_api_app() -> None:
    """app.py builds the admin app and hands it a view of itself; the admin
    app never reaches back (not even for type checking)."""
    assert "proxy.admin" in _imports("proxy/app.py") or ".admin" in _imports("proxy/app.py")
    assert not {".app", "proxy.app"} & _imports("proxy/admin.py")


def test_the_router_does_not_import_the_relay() -> None:
    """Layers talk down through the opener interface: the router knows nothing of the relay above it."""
    assert not {".relay", "proxy.relay"} & _imports("proxy/router.py")
    assert not {".app", "proxy.app", ".relay"} & _imports("proxy/caching.py")
