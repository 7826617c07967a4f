"""Crash safety (issue 7): SIGKILL a real `prelort run` in the middle of a round, resume it, and get
bit for bit the run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"

# Rounds long enough that the kill lands inside round 2's training: 4 clients x 30 steps take ~1.4 s per round
# on one thread (4 steps took 0.2 s, and a 0.5 s wait once overshot round 2 on CI).
SETS = [
    "rounds=3",
    "train.local_steps=30",
    "train.batch_size=2",
    "data.max_length=32",
    "data.num_train=48",
    "data.num_test=4",
    "eval.max_examples=2",
    "eval.max_new_tokens=2",
    "eval.truncation_curve=false",
    "prelort.nested=sample",
]
DEADLINE_S = 420  # the whole test, every subprocess included


def start_run(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prelort", "run", str(TINY), "--out", str(out), "-q"]
    for s in SETS:
        cmd += ["--set", s]
    cmd += list(extra)
    # own process group: a failing test kills the run and anything it started
    # one thread each: two runs share the machine, and oversubscribed torch threads slow both tenfold
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def finish(proc: subprocess.Popen, deadline: float) -> str:
    out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    assert proc.returncode == 0, out
    return out


def metric_lines(run_dir: Path) -> list[dict]:
    recs = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        recs.append(json.loads(line))  # a partial line fails here
    return recs


def check_run(run_dir: Path) -> None:
    from prelort.check import check_run_dir

    problems = check_run_dir(run_dir)
    assert not problems, "\n".join(problems)


def test_sigkill_mid_round_then_resume_is_bit_identical(tmp_path):
    deadline = time.monotonic() + DEADLINE_S
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(reference := start_run(reference_dir))
        procs.append(victim := start_run(crashed_dir))
        # wait until round 1 is checkpointed and logged: round 2's training is then under way
        log = crashed_dir / "run.log"
        while not (log.is_file() and "round 1/3:" in log.read_text()):
            assert victim.poll() is None, f"the run ended before round 2: {victim.communicate()[0]}"
            assert time.monotonic() < deadline, "round 1 did not finish in time"
            time.sleep(0.05)
        time.sleep(0.2)  # round 2 (120 optimizer steps) is then under way and far from its checkpoint
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL
        checkpoints = sorted(p.name for p in (crashed_dir / "checkpoints").iterdir() if not p.name.startswith("."))
        assert checkpoints == ["round-0", "round-1"], f"the kill did not land in round 2: {checkpoints}"

        procs.append(resumed := start_run(crashed_dir, "--resume"))
        finish(resumed, deadline)
        finish(reference, deadline)
    finally:
        for p in procs:
            kill(p)

    assert "resuming after round 1" in (crashed_dir / "run.log").read_text()
    for run_dir in (reference_dir, crashed_dir):
        check_run(run_dir)
    # the final global adapter, its state and every exported PEFT adapter: identical bytes
    for rel in [
        "checkpoints/round-3/adapter.safetensors",
        "checkpoints/round-3/state.json",
        *[f"adapters/rank-{t}/adapter_model.safetensors" for t in (1, 2, 4, 8)],
    ]:
        assert (crashed_dir / rel).read_bytes() == (reference_dir / rel).read_bytes(), rel
    for r in (1, 2):
        rel = f"checkpoints/round-{r}/adapter.safetensors"
        assert (crashed_dir / rel).read_bytes() == (reference_dir / rel).read_bytes(), rel

    # metrics.jsonl: every line whole, one record per (round, kind, rank), the same records as the reference
    resumed_recs, reference_recs = metric_lines(crashed_dir), metric_lines(reference_dir)
    keys = [(r["round"], r.get("kind"), r["rank"]) for r in resumed_recs]
    assert len(keys) == len(set(keys)), f"duplicate records: {keys}"
    assert [r["round"] for r in resumed_recs if r.get("kind") == "train"] == [1, 2, 3]

    def comparable(recs: list[dict]) -> list[dict]:
        return sorted(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) for r in recs)

    assert comparable(resumed_recs) == comparable(reference_recs)
