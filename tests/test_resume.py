"""Interrupting a run and resuming it keeps every record (issue 16): Ctrl-C stops at a safe point with one
line, a resume redoes what the last complete round's records lack (metrics.jsonl then equals the
uninterrupted run's, record by record), a resume of a finished run does nothing, and the truncation curve
reuses the tier records of its round."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.cli_runner import checkout_env

from prelort import config as config_mod
from prelort import runner
from prelort.rundir import MetricsLog, RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
# ranks 2/2/4/8: tiers 2, 4, 8 and a truncation curve over t = 1, 2, 4, 8 (t = 1 is no tier); 4 local steps make
# a round long enough that the Ctrl-C test's signal lands before the last round
SMALL = [
    "rounds=3",
    "clients.ranks=[2, 2, 4, 8]",
    "train.local_steps=4",
    "data.num_train=32",
    "data.num_test=4",
    "eval.max_examples=2",
    "eval.max_new_tokens=2",
    "prelort.nested=sample",
]


def cfg(*extra: str) -> config_mod.Config:
    return config_mod.load(TINY, [*SMALL, *extra])


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl in order, without the wall-clock seconds (the one field that differs between runs)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("seconds", None)
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reference") / "run"
    runner.run(cfg(), d, verbose=False)
    return d


def interrupt_on_call(monkeypatch, cls, name: str, when) -> list[int]:
    """Make ``cls.name`` raise KeyboardInterrupt (a Ctrl-C at that moment) on the first call where
    ``when(n, *args)`` holds (n counts the calls from 1); returns the call counter."""
    real = getattr(cls, name)
    calls = [0]

    def wrapped(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 0 and when(calls[0], *args):
            calls[0] = -(10**9)  # only once
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapped)
    return calls


@pytest.mark.parametrize("where", ["round 2 tier evaluation", "round 2 training record", "final truncation curve"])
def test_an_interrupted_and_resumed_run_has_the_uninterrupted_records(tmp_path, monkeypatch, reference, where):
    d = tmp_path / "run"
    if where == "round 2 tier evaluation":  # after round 2's tier-2 record: tiers 4 and 8 missing
        interrupt_on_call(monkeypatch, runner.Session, "evaluate_tier_examples", lambda n, t: n == 5)
        completed = 2
    elif where == "round 2 training record":  # round 2 is checkpointed, none of its records written
        interrupt_on_call(
            monkeypatch, MetricsLog, "write", lambda n, rec: rec.get("kind") == "train" and rec.get("round") == 2
        )
        completed = 2
    else:  # the curve's t = 1, the only t that is not a tier
        interrupt_on_call(monkeypatch, runner.Session, "evaluate_tier_examples", lambda n, t: n == 10)
        completed = 3
    with pytest.raises(runner.RunInterrupted) as info:
        runner.run(cfg(), d, verbose=False)
    assert info.value.completed == completed
    monkeypatch.undo()
    assert not RunDir(d).is_complete(cfg())
    runner.run(cfg(), d, resume=True, verbose=False)
    assert records(d) == records(reference)
    for t in (2, 4, 8):
        rel = f"adapters/rank-{t}/adapter_model.safetensors"
        assert (d / rel).read_bytes() == (reference / rel).read_bytes()
    assert RunDir(d).is_complete(cfg())


def test_the_truncation_curve_reuses_the_tier_records_of_its_round(reference):
    recs = records(reference)
    tiers = {r["rank"]: r for r in recs if r["kind"] == "tier" and r["round"] == 3}
    curve = {r["rank"]: r for r in recs if r["kind"] == "curve"}
    assert sorted(curve) == [1, 2, 4, 8] and sorted(tiers) == [2, 4, 8]
    for t in (2, 4, 8):
        assert {k: v for k, v in curve[t].items() if k != "kind"} == {k: v for k, v in tiers[t].items() if k != "kind"}


def test_the_curve_evaluates_only_the_t_that_are_no_tier(tmp_path, monkeypatch):
    evaluated = []
    real = runner.Session.evaluate_tier_examples

    def spy(self, t):
        evaluated.append((self.federation.round, t))
        return real(self, t)

    monkeypatch.setattr(runner.Session, "evaluate_tier_examples", spy)
    runner.run(cfg("rounds=1"), tmp_path / "run", verbose=False)
    assert evaluated == [(1, 2), (1, 4), (1, 8), (1, 1)]
    # the reused tiers' per-example records are the curve's too (eval/round-1.jsonl)
    lines = [json.loads(x) for x in (tmp_path / "run" / "eval" / "round-1.jsonl").read_text().splitlines()]
    for t in (1, 2, 4, 8):
        assert [x for x in lines if x["kind"] == "curve" and x["rank"] == t], t
    for t in (2, 4, 8):

        def strip(kind: str, t: int = t) -> list[dict]:
            return [{k: v for k, v in x.items() if k != "kind"} for x in lines if x["kind"] == kind and x["rank"] == t]

        assert strip("curve") == strip("tier")


def test_resume_of_a_finished_run_says_so_and_does_nothing(reference, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.rglob("*") if p.is_file()}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "prelort",
            "run",
            str(TINY),
            "--out",
            str(reference),
            *[a for s in SMALL for a in ("--set", s)],
            "--resume",
        ],
        capture_output=True,
        text=True,
        env=checkout_env(),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{reference} is a finished run (3 rounds, every record written): nothing to do"
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.rglob("*") if p.is_file()}
    assert after == before


def test_ctrl_c_stops_after_the_round_with_one_line_and_the_printed_command_resumes(tmp_path, reference):
    d = tmp_path / "run"
    # the reference ran in this process: the runs below use its thread count, since another count splits float
    # reductions differently and the records would differ in the last bits for a reason that is not the resume
    env = checkout_env({"OMP_NUM_THREADS": str(torch.get_num_threads())})
    cmd = [
        sys.executable,
        "-m",
        "prelort",
        "run",
        str(TINY),
        "--out",
        str(d),
        *[a for s in SMALL for a in ("--set", s)],
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600
        log = d / "run.log"
        while not (log.is_file() and "round 1/3:" in log.read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "round 1 did not finish in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"error: interrupted after round (\d); resume with: (prelort run .* --resume)", last)
    assert m, last
    assert int(m.group(1)) in (1, 2) and f"round-{m.group(1)}" in os.listdir(d / "checkpoints")
    resume = shlex.split(m.group(2))
    assert resume[:2] == ["prelort", "run"]
    res = subprocess.run(
        [sys.executable, "-m", "prelort", *resume[1:]], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr
    assert records(d) == records(reference)
