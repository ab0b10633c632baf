"""``python -m mock``: the mock upstream on its own (``weir mock-upstream`` is the same)."""

import sys

from .upstream import main

sys.exit(main())
