"""``hypercorn -c python:proxy.hypercorn_conf.config proxy.asgi:app``: the app from ``WEIR_CONFIG`` and ``WEIR_*``.

Building the app does no I/O (that waits for the lifespan), so importing
this module in each Hypercorn worker is cheap and safe; the one exception is
creating ``server.data_dir``, which every entry point does before its event
loop starts (proxy/datadir.py). Importing it also installs proxy/server.py's
connection guard into Hypercorn's trio worker, which looks its connection
class up only after loading the app.
"""

from __future__ import annotations

import os

from .app import build_app
from .cli import BuiltinMockApp
from .datadir import prepare_data_dir
from .logs import configure_logging
from .server import Guard, install
from .settings import check_exposure, load_settings

settings = load_settings()
check_exposure(settings, os.environ)
prepare_data_dir(settings.server.data_dir)
configure_logging(settings.server.log_level)
install()
# No upstream configured: the mock upstream starts with the lifespan, as under ``weir serve``.
app = Guard(BuiltinMockApp(settings) if settings.uses_mock() else build_app(settings))
