"""bench/_common.py and quality_study.ensure_run: run claims shared by processes of one command, and results
JSON writes that keep what other stages and other processes wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bench_scripts import load_bench

common = load_bench("_common")
qs = load_bench("quality_study")


@pytest.fixture
def live_pid():
    """The pid of a live process that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def claim_file(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".claim")


def test_a_claim_is_exclusive_and_a_stale_one_is_taken_over(tmp_path, live_pid, dead_pid):
    run = tmp_path / "runs" / "a"
    assert common.claim_run(run) is None and claim_file(run).read_text().strip() == str(os.getpid())
    assert common.claim_run(run) is None  # already this process's
    common.release_run(run)
    assert not claim_file(run).exists()
    claim_file(run).write_text(f"{live_pid}\n")
    assert common.claim_run(run) == live_pid and common.claim_holder(run) == live_pid
    common.release_run(run)  # not this process's claim: left alone
    assert claim_file(run).read_text().strip() == str(live_pid)
    claim_file(run).write_text(f"{dead_pid}\n")
    assert common.claim_holder(run) is None
    assert common.claim_run(run) is None and claim_file(run).read_text().strip() == str(os.getpid())


class Writer:
    """A fake run: what ensure_run's finished-run check reads (config.yaml)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, cfg, run_dir: Path) -> None:
        self.calls += 1
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())


def tiny_config():
    from prelort import config as config_mod

    return config_mod.load(Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml")


def test_ensure_run_leaves_a_claimed_run_to_its_process_or_waits_for_it(tmp_path, live_pid, monkeypatch):
    cfg, run = tiny_config(), tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "partial").write_text("the other process's run, under way")
    claim_file(run).write_text(f"{live_pid}\n")
    write = Writer()
    assert qs.ensure_run(cfg, run, write, wait=False) is None
    assert write.calls == 0 and (run / "partial").exists()  # another's run in progress is never deleted

    def the_other_process_finishes():
        time.sleep(0.3)
        (run / "config.yaml").write_text(cfg.to_yaml())
        common.write_json(run / qs.DONE, {"wall_seconds": 12.5})
        claim_file(run).unlink()

    monkeypatch.setattr(qs, "CLAIM_POLL_SECONDS", 0.05)
    other = threading.Thread(target=the_other_process_finishes)
    other.start()
    assert qs.ensure_run(cfg, run, write, wait=True) == (False, 12.5)
    other.join()
    assert write.calls == 0


def test_ensure_run_takes_over_the_run_of_a_dead_process_and_releases_its_claim(tmp_path, dead_pid):
    cfg, run = tiny_config(), tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "partial").write_text("killed part-way")
    claim_file(run).write_text(f"{dead_pid}\n")
    write = Writer()
    ran, _ = qs.ensure_run(cfg, run, write, wait=False)
    assert ran and write.calls == 1 and not (run / "partial").exists() and (run / qs.DONE).is_file()
    assert not claim_file(run).exists()

    def fails(cfg, run_dir):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        qs.ensure_run(cfg, tmp_path / "runs" / "b", fails)
    assert not claim_file(tmp_path / "runs" / "b").exists()  # a failed run does not keep its claim


def test_write_stage_keeps_the_other_stages_and_the_runs_on_disk(tmp_path):
    path = tmp_path / "s2.json"
    header = {"benchmark": "quality_study_2"}
    common.write_stage(path, "stage_a", {"runs": {"a1": {"x": 1}}, "gate": "passed"}, header)
    common.write_stage(path, "stage_b", {"runs": {"b1": {"x": 2}}}, header)
    on_disk = json.loads(path.read_text())
    assert on_disk["stage_a"] == {"runs": {"a1": {"x": 1}}, "gate": "passed"}
    assert on_disk["stage_b"] == {"runs": {"b1": {"x": 2}}} and on_disk["benchmark"] == "quality_study_2"
    # a second writer of stage_b that has not seen b1: b1 survives, and is counted before the write
    other = {"runs": {"b2": {"x": 3}, "b3": {"x": 4}}}
    written = common.write_stage(path, "stage_b", other, header, lambda st: st.update(done=len(st["runs"])))
    assert set(written["stage_b"]["runs"]) == {"b1", "b2", "b3"} and written["stage_b"]["done"] == 3
    assert list(other["runs"]) == ["b1", "b2", "b3"]  # the writer's own view has them too, in key order
    assert list(json.loads(path.read_text())["stage_b"]["runs"]) == ["b1", "b2", "b3"]
    # a run in both: the writer's record wins
    common.write_stage(path, "stage_b", {"runs": {"b1": {"x": 9}}}, header)
    assert json.loads(path.read_text())["stage_b"]["runs"]["b1"] == {"x": 9}
    assert json.loads(path.read_text())["stage_a"]["gate"] == "passed"
    path.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a JSON object"):
        common.write_stage(path, "stage_b", {"runs": {}}, header)
    assert path.read_text() == "[1, 2]"
