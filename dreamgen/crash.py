"""The last resort of the CLI: an unexpected error becomes one line plus a log file.

A traceback on a user's terminal says nothing they can act on and buries the line that
matters; the traceback still matters to whoever fixes the bug, so it goes to a file and
the line names that file.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from dreamgen.sandbox import one_line


def crash_dir() -> Path:
    """Where tracebacks go: ``$DREAMGEN_CRASH_DIR``, else ``<tmp>/dreamgen-crashes``."""
    env = os.environ.get("DREAMGEN_CRASH_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "dreamgen-crashes"


def internal_error_line(exc: BaseException, argv: list[str]) -> str:
    """Write ``exc``'s traceback to a new log file; return the one line to print."""
    what = f"{type(exc).__name__}: {one_line(exc, 200)}"
    try:
        folder = crash_dir()
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = folder / f"crash-{stamp}-{os.getpid()}.log"
        with path.open("w", encoding="utf-8") as f:
            f.write(f"argv: {argv!r}\n\n")
            f.write("".join(traceback.format_exception(exc)))
    except OSError as err:  # nowhere to write it: still one line
        return f"internal: {what} (traceback not saved: {err.strerror or err})"
    return f"internal: {what} (traceback in {path}; please report it)"
