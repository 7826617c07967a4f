"""The run directory's lock and where a run directory may be (issue 26, items 1, 2 and 9); no model is loaded.

The lock is an OS lock (``fcntl.flock``) on ``.prelort.lock``: the kernel decides who holds it, whatever the
file says, and a process that dies lets go of it. The file's JSON (pid, host, start time) only names the
holder in the refusal. A run directory is never inside another run, nor holds one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prelort import rundir
from prelort.rundir import LOCK, MARKER, RunDir, RunDirError, check_out

# The prelort under test (whichever this test imported): the subprocesses below must run the same code.
SRC = Path(rundir.__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(SRC))


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def _tiny_cfg():
    from prelort import config as config_mod

    return config_mod.load(Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml")


@pytest.fixture()
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / MARKER).write_text("{}\n")
    yield d
    RunDir(d).release_lock()


# ----------------------------------------------------------------------------------------------
# item 1: one holder, decided by the kernel
# ----------------------------------------------------------------------------------------------
# Each racer takes the lock of directory i at the same instant as the others (a spin on a shared start
# time), keeps every lock it won until the parent has every racer's results, and reports won / refused.
RACER = r"""
import json, sys, time
from prelort import rundir
dirs = json.loads(sys.argv[1])
print("ready", flush=True)
start, slot = map(float, sys.stdin.readline().split())
results = []
for i, d in enumerate(dirs):
    at = start + i * slot
    while time.time() < at:
        pass
    try:
        rundir.RunDir(d).acquire_lock()
        results.append("won")
    except rundir.RunDirError:
        results.append("refused")
print(json.dumps(results), flush=True)
sys.stdin.readline()  # hold what was won until every racer has tried
"""


def _race(dirs: list[Path], racers: int = 3, slot: float = 0.02) -> list[int]:
    """How many racers won each directory's lock (every racer tries each directory at the same instant)."""
    procs = [_python(RACER, json.dumps([str(d) for d in dirs])) for _ in range(racers)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        start = time.time() + 0.2
        for p in procs:
            p.stdin.write(f"{start} {slot}\n")
            p.stdin.flush()
        results = []
        for p in procs:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            results.append(json.loads(line))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return [sum(r[i] == "won" for r in results) for i in range(len(dirs))]


def _stale_content() -> str:
    """What a lock file left by a killed run holds (its process is gone)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "1"})


def test_exactly_one_process_wins_a_race_for_the_lock(tmp_path):
    """Three processes take the lock of 100 directories at the same instant each, half of them with a stale
    lock file (its process is gone) and half without one: exactly one wins each directory.

    Before the OS lock, two processes could both hold it: a stale lock was taken over by unlink-then-retry
    (one process unlinked the lock the other had just created), and a lock created but not yet written read
    as stale."""
    stale = _stale_content()
    dirs = []
    for i in range(100):
        d = tmp_path / f"run-{i}"
        d.mkdir()
        if i % 2:
            (d / LOCK).write_text(stale)
        dirs.append(d)
    winners = _race(dirs)
    wrong = [(d.name, "stale lock" if i % 2 else "no lock", n) for i, (d, n) in enumerate(zip(dirs, winners)) if n != 1]
    assert not wrong, wrong


HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
if len(sys.argv) > 2:
    os.write(fd, sys.argv[2].encode())
print("locked", flush=True)
sys.stdin.readline()
"""


class _Holder:
    """A process holding the flock of ``run_dir``'s lock file, with ``content`` written (or nothing, as a run
    between taking the lock and writing its name)."""

    def __init__(self, run_dir: Path, content: str | None = None):
        self.proc = _python(HOLDER, str(run_dir / LOCK), *([content] if content is not None else []))
        assert self.proc.stdout.readline().strip() == "locked", self.proc.stderr.read()

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def test_a_lock_taken_but_not_yet_written_is_not_taken_over(run_dir):
    with _Holder(run_dir):
        with pytest.raises(RunDirError, match=r"in use by another prelort run \(PID unknown on an unknown host\)"):
            RunDir(run_dir).acquire_lock()
    assert (run_dir / LOCK).read_text() == ""  # untouched


def test_a_live_holder_is_named_and_its_lock_goes_when_it_is_killed(run_dir, caplog):
    holder = _python(
        "import sys; from prelort import rundir; rundir.RunDir(sys.argv[1]).acquire_lock(); print('locked', "
        "flush=True); sys.stdin.readline()",
        str(run_dir),
    )
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(RunDirError) as e:
            RunDir(run_dir).prepare(_tiny_cfg(), resume=False)
        assert str(e.value) == (
            f"{run_dir} is in use by another prelort run (PID {holder.pid} on {socket.gethostname()}); "
            "wait for it to finish or choose another --out"
        )
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, the lock file stays
        holder.wait()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="prelort"):
        assert RunDir(run_dir).acquire_lock() == run_dir / LOCK
    assert "taking over the stale lock" in caplog.text
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()


def test_the_same_process_takes_the_lock_again_and_releases_it(run_dir):
    run = RunDir(run_dir)
    assert run.acquire_lock() == run.lock_file
    content = run.lock_file.read_text()
    assert run.acquire_lock() == run.lock_file  # re-entrant
    assert RunDir(run_dir / ".." / run_dir.name).acquire_lock()  # the same directory by another path
    assert run.lock_file.read_text() == content
    run.release_lock()
    assert not run.lock_file.exists()
    run.release_lock()  # not held: nothing
    run.acquire_lock()
    assert run.lock_file.is_file()


# ----------------------------------------------------------------------------------------------
# item 9: whatever the lock file holds
# ----------------------------------------------------------------------------------------------
def _named(pid) -> str:
    return f'{{"pid": {pid}, "host": {json.dumps(socket.gethostname())}, "started": null}}'


HOSTILE = {
    "pid 1e30": _named("1e30"),
    "pid Infinity": _named("Infinity"),
    "pid NaN": _named("NaN"),
    "pid 2**40": _named(2**40),
    "pid 2**64": _named(2**64),
    "pid -1": _named(-1),
    "pid 0": _named(0),
    "pid 1 (alive, not holding it)": _named(1),
    "this process's pid": json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": rundir._start_time(os.getpid())}
    ),
    "pid of 5000 digits": _named("9" * 5000),
    "pid a string": _named('"12"'),
    "pid a list": _named("[1]"),
    "no pid": "{}",
    "a JSON list": "[1, 2]",
    "not JSON": "not a lock",
    "not UTF-8": "\udcff",
    "another host": '{"pid": 2, "host": "elsewhere"}',
}


@pytest.mark.parametrize("content", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_lock_file_no_process_holds_is_taken_over_whatever_it_holds(run_dir, content):
    (run_dir / LOCK).write_bytes(content.encode("utf-8", "surrogateescape"))
    RunDir(run_dir).acquire_lock()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("content", ["pid 2**40", "pid Infinity", "pid -1", "not JSON", "pid of 5000 digits"])
def test_a_held_lock_is_refused_whatever_it_holds(run_dir, content):
    with _Holder(run_dir, HOSTILE[content]):
        with pytest.raises(RunDirError, match=r"in use by another prelort run \(PID unknown on "):
            RunDir(run_dir).acquire_lock()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


@pytest.mark.parametrize(
    "kind, make",
    [
        ("a directory", lambda p: p.mkdir()),
        ("a directory", lambda p: (p.mkdir(), (p / "x").write_text("x"))),
        ("a symbolic link", lambda p: p.symlink_to(p.parent / "notes.txt")),
        ("a symbolic link", lambda p: p.symlink_to(p.parent / "nowhere")),
        ("a FIFO", _fifo),
    ],
    ids=["directory", "non-empty directory", "link to a file", "dangling link", "fifo"],
)
def test_a_lock_path_that_is_not_a_regular_file_is_refused_in_one_line(run_dir, kind, make):
    (run_dir / "notes.txt").write_text("the user's notes\n")
    make(run_dir / LOCK)
    result: list[BaseException | None] = []

    def take() -> None:  # in a thread: reading a FIFO could block for ever
        try:
            RunDir(run_dir).acquire_lock()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - the test looks at whatever it raised
            result.append(e)

    import threading

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(20)
    assert result, "taking the lock blocked"
    err = result[0]
    assert isinstance(err, RunDirError), repr(err)
    assert str(err) == (
        f"{run_dir / LOCK} is {kind}, not prelort's lock file; remove it (prelort creates the lock itself) or "
        "choose another --out"
    )
    assert (run_dir / "notes.txt").read_text() == "the user's notes\n"


# ----------------------------------------------------------------------------------------------
# item 2: a run directory is never inside another run, nor holds one
# ----------------------------------------------------------------------------------------------
def _run_with_checkpoint(d: Path, marker: bool = True) -> Path:
    (d / "checkpoints" / "round-0").mkdir(parents=True)
    if marker:
        (d / MARKER).write_text("{}\n")
    return d


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize(
    "inner",
    ["inner", "a/b/inner", "checkpoints/round-7", "checkpoints/x", "adapters/rank-4/inner"],
)
def test_an_out_inside_another_run_is_refused(tmp_path, inner, resume):
    outer = _run_with_checkpoint(tmp_path / "outer")
    out = outer / inner
    if resume:
        _run_with_checkpoint(out)
    with pytest.raises(RunDirError) as e:
        check_out(out, resume=resume)
    assert str(e.value) == (
        f"--out {out} is inside the prelort run directory {outer.resolve()}; a run directory cannot be inside "
        "another run (choose an --out outside it)"
    )


def test_an_out_inside_a_run_from_before_the_marker_or_a_new_run_is_refused(tmp_path):
    old = _run_with_checkpoint(tmp_path / "old", marker=False)  # checkpoints/round-N, no marker
    with pytest.raises(RunDirError, match="is inside the prelort run directory"):
        check_out(old / "inner", resume=False)
    new = tmp_path / "new"  # marked, no checkpoint yet (a run that has just started)
    new.mkdir()
    (new / MARKER).write_text("{}\n")
    with pytest.raises(RunDirError, match="is inside the prelort run directory"):
        check_out(new / "inner", resume=False)
    plain = tmp_path / "plain" / "checkpoints"  # a checkpoints/ of something else: not a run
    plain.mkdir(parents=True)
    (plain / "model.pt").write_text("")
    assert check_out(tmp_path / "plain" / "out", resume=False) == tmp_path / "plain" / "out"


@pytest.mark.parametrize("where", ["inner", "a/b/c/inner", "checkpoints/round-9/inner"])
@pytest.mark.parametrize("inner_kind", ["marked", "checkpoints only"])
def test_a_run_holding_another_run_is_refused_and_its_resume_too(tmp_path, where, inner_kind):
    outer = _run_with_checkpoint(tmp_path / "outer")
    inner = outer / where
    inner.mkdir(parents=True)
    if inner_kind == "marked":
        (inner / MARKER).write_text("{}\n")
    else:
        _run_with_checkpoint(inner, marker=False)
    message = (
        f"--out {outer} holds the prelort run directory {inner}; a run directory cannot hold another run "
        f"(move {inner} out of it or choose another --out)"
    )
    with pytest.raises(RunDirError) as e:
        check_out(outer, resume=True)  # resuming would delete checkpoints/round-9/inner as damaged
    assert str(e.value) == message
    shutil.rmtree(outer / "checkpoints" / "round-0")  # a marked run directory without a checkpoint may be
    if not any((outer / "checkpoints").iterdir()):  # reused...
        (outer / "checkpoints").rmdir()
    with pytest.raises(RunDirError) as e:
        check_out(outer, resume=False)  # ...but not while it holds a run
    assert str(e.value) == message


def test_a_directory_holding_a_run_is_refused_naming_it(tmp_path):
    runs = tmp_path / "runs"
    inner = _run_with_checkpoint(runs / "a" / "seed-0")
    with pytest.raises(RunDirError, match=f"--out {runs} holds the prelort run directory {inner};"):
        check_out(runs, resume=False)


def test_the_search_below_is_bounded(tmp_path, monkeypatch):
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / MARKER).write_text("{}\n")
    for i in range(60):
        (outer / f"f{i}").write_text("")
    (outer / "sub").mkdir()
    (outer / "sub" / MARKER).write_text("{}\n")
    assert rundir._run_below(outer) == outer / "sub"
    assert rundir._run_below(outer, limit=30) is None  # gave up
    monkeypatch.setattr(rundir, "SCAN_LIMIT", 30)
    assert check_out(outer, resume=False) == outer


def test_prelort_run_refuses_an_out_inside_another_run(tmp_path):
    outer = _run_with_checkpoint(tmp_path / "outer")
    tiny = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"
    res = subprocess.run(
        [sys.executable, "-m", "prelort", "run", str(tiny), "--out", str(outer / "checkpoints" / "mine")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: --out {outer / 'checkpoints' / 'mine'} is inside the prelort run directory {outer.resolve()}; a "
        "run directory cannot be inside another run (choose an --out outside it)"
    ]
    assert sorted(p.name for p in outer.rglob("*")) == sorted(["checkpoints", "round-0", MARKER])  # nothing added
