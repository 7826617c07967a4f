"""``prelort(*args)``: the `prelort` command as a user runs it, for the tests of the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prelort(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, stdin: int | None = None
) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process (so imports and exit codes are real), from the repository
    root, with this checkout's src/ on the path; ``env`` adds variables."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "prelort", *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=timeout,
    )
