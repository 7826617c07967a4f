"""The launcher's bounded retry loop and its reading of Flower's JSON output (`flwr ... --format json`)."""

from __future__ import annotations

import subprocess
import time

import pytest

pytest.importorskip("flwr")

from prelort.apps.launch import FlowerRunError, _flwr, _json_out, poll  # noqa: E402


def test_poll_returns_the_first_result_and_stops_at_the_deadline():
    answers = iter([None, None, "ready"])
    assert poll(lambda: next(answers), timeout=5.0, interval=0.01) == "ready"
    calls = []
    started = time.monotonic()
    assert poll(lambda: calls.append(1), timeout=0.3, interval=0.05) is None  # never ready: None at the deadline
    assert 0.3 <= time.monotonic() - started < 2.0 and len(calls) >= 3
    assert poll(lambda: 0, timeout=0, interval=1.0) == 0  # runs once with no time at all; 0 is a result
    with pytest.raises(ZeroDivisionError):
        poll(lambda: 1 / 0, timeout=5.0, interval=0.01)  # a failing check ends the loop


def done(stdout: str, returncode: int = 0) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["flwr"], returncode, stdout=stdout, stderr="")


def test_flower_json_output_is_read_whole():
    assert _json_out(done('{\n  "success": true,\n  "run-id": 7\n}\n'), "run") == {"success": True, "run-id": 7}
    for bad in (
        done('{"success": false, "error-message": "no connection"}'),
        done('{"success": true}', returncode=1),
        done('Loading config...\n{"success": true}'),  # not Flower's JSON output: text before it
        done("[1, 2]"),
        done(""),
    ):
        with pytest.raises(FlowerRunError, match="`flwr run` failed"):
            _json_out(bad, "run")


def test_a_real_flwr_error_is_one_json_document(tmp_path):
    proc = _flwr(["ls", "no-such-connection", "--format", "json"], tmp_path / "flwr-home", timeout=120)
    with pytest.raises(FlowerRunError, match="no-such-connection"):
        _json_out(proc, "ls")
