"""Running the ``dreamgen`` command line as a subprocess, the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dreamgen(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m dreamgen ARGS`` from the repository root; ``env`` adds to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "dreamgen", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The run failed with ``code`` and said why in one line, without a traceback."""
    assert proc.returncode == code, proc.stdout[-1000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]
