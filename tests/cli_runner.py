"""``prelort(*args)``: the `prelort` command as a user runs it, for the tests of the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with this checkout's src/ on the path (not whatever prelort is installed),
    plus ``extra``: for a child Python a test starts."""
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(extra or {}))


def prelort(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, stdin: int | None = None
) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process (so imports and exit codes are real), from the repository
    root, with this checkout's src/ on the path; ``env`` adds variables."""
    return subprocess.run(
        [sys.executable, "-m", "prelort", *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=checkout_env(env),
        timeout=timeout,
    )


def prelort_here(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command run inside the test process (typer's runner): the same exit code, stdout and stderr as
    :func:`prelort` without the ~12 s a fresh process spends importing torch, transformers and PEFT. For the
    tests whose subject is not the process itself (imports, signals, locks held by another process)."""
    from typer.testing import CliRunner

    from prelort.apps.cli import app

    res = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(["prelort", *args], res.exit_code, res.stdout, res.stderr)
