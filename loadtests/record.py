"""Where benchmark results go, so that running a benchmark never dirties git.

Every run writes ``loadtests/results/runs/<name>-<timestamp>.<ext>``; that
directory is ignored by git, so keep as many runs as you like. The committed
figures — ``loadtests/results/<latest>.<ext>``, the ones README and the notes
cite — change only when a run is saved on purpose with ``--save``: a diff in
them is always a decision, never a side effect of measuring.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["RESULTS", "add_save_flag", "record"]

RESULTS = Path(__file__).resolve().parent / "results"


def add_save_flag(parser: argparse.ArgumentParser, latest: str) -> None:
    parser.add_argument(
        "--save", action="store_true", help=f"also overwrite the committed loadtests/results/{latest}.* with this run"
    )


def record(name: str, latest: str, files: dict[str, str | bytes], *, save: bool, out: Path = RESULTS) -> list[Path]:
    """Write one run's files (extension → content); returns the paths written."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stems = [runs / f"{name}-{stamp}"] + ([out / latest] if save else [])
    written = []
    for stem in stems:
        for ext, content in files.items():
            path = stem.parent / f"{stem.name}.{ext}"
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
            written.append(path)
    return written
