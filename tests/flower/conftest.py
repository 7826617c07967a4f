"""Fixtures of the Flower tests that start a SuperLink and SuperNodes as subprocesses on loopback."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

# Hard bound of a test that uses ``processes``, unless its module sets TIME_LIMIT: a watchdog then stops them.
TIME_LIMIT = 300.0


class Processes:
    """Every process the test starts, each in its own process group; all stopped at the end."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.tmp, self.env, self.procs = tmp, env, []

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env={**self.env, **(env or {})},
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        from prelort.apps.launch import stop_process_group

        for proc in reversed(self.procs):
            stop_process_group(proc, grace=10.0)


@pytest.fixture
def processes(tmp_path, request):
    """Start processes with ``processes.start(name, cmd)``; all are stopped at the end of the test, and after the
    module's ``TIME_LIMIT`` seconds by a watchdog."""
    pytest.importorskip("flwr")
    from prelort.apps.launch import flower_env

    env = flower_env(tmp_path / "flwr-home")
    procs = Processes(tmp_path, env)
    watchdog = threading.Timer(getattr(request.module, "TIME_LIMIT", TIME_LIMIT), procs.stop_all)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield procs
    finally:
        watchdog.cancel()
        procs.stop_all()
        assert all(p.poll() is not None for p in procs.procs)
