"""What a finished run leaves, and who may read and write it (issue 26): `prelort check` verifies every
checkpoint's checksums, `--resume` finishes whatever the contract still lacks, and `export` / `report --out`
never overwrite a user's files or the run's own."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prelort import config as config_mod
from prelort import runner
from prelort.apps.cli import app
from prelort.check import check_run_dir
from prelort.rundir import LOCK, RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
SMALL = [
    "rounds=2",
    "train.local_steps=1",
    "data.num_train=32",
    "data.num_test=4",
    "eval.max_examples=2",
    "eval.max_new_tokens=2",
]
cli = CliRunner()


def cfg() -> config_mod.Config:
    return config_mod.load(TINY, SMALL)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-round run (ranks 1/2/4/8); tests change only their copies of it (:func:`copy_run`)."""
    d = tmp_path_factory.mktemp("finished") / "run"
    runner.run(cfg(), d, verbose=False)
    return d


def copy_run(finished: Path, tmp_path: Path, name: str = "run") -> Path:
    # never with a lock file (run() removes its own; a copied one would name this live process as the holder)
    return Path(shutil.copytree(finished, tmp_path / name, ignore=shutil.ignore_patterns(LOCK)))


def test_a_finished_run_lets_go_of_its_log_and_its_lock(finished):
    """In a notebook or a test, the process goes on after run(): what it logs next belongs to no run, and
    another process may resume the directory at once."""
    log_file = RunDir(finished).log_file
    before = log_file.read_text()
    assert before.strip(), "the run wrote nothing to run.log"
    logging.getLogger("prelort").warning("something this process does after the run")
    assert log_file.read_text() == before
    assert not (finished / LOCK).exists()
    assert not [h for h in logging.getLogger("prelort").handlers if isinstance(h, logging.FileHandler)]


# ----------------------------------------------------------------------------------------------
# prelort check: the checksums
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["round-2/adapter.safetensors", "round-1/state.json"])
def test_check_names_a_checkpoint_file_that_does_not_match_its_checksum(finished, tmp_path, damaged):
    run = copy_run(finished, tmp_path)
    assert check_run_dir(run) == []
    path = run / "checkpoints" / damaged
    data = bytearray(path.read_bytes())
    # one bit: of the adapter, the lowest mantissa bit of its last float32 (still finite, still readable)
    data[-4 if path.suffix == ".safetensors" else 1] ^= 0x01
    path.write_bytes(bytes(data))
    line = f"checkpoint file checkpoints/{damaged} does not match its checksum (damaged or edited)"
    assert check_run_dir(run) == [line]
    res = cli.invoke(app, ["check", str(run)])
    assert res.exit_code == 2 and line in res.output.splitlines()


# ----------------------------------------------------------------------------------------------
# a truncated latest adapter without checksums.json
# ----------------------------------------------------------------------------------------------
def test_export_falls_back_past_a_truncated_latest_adapter_without_checksums(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    latest = run / "checkpoints" / "round-2"
    (latest / "checksums.json").unlink()
    adapter = latest / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    res = cli.invoke(app, ["export", str(run), "--rank", "2", "--out", str(tmp_path / "exported")])
    assert res.exit_code == 0, res.output
    assert f"exported round-1 rank-2 adapter to {tmp_path / 'exported'}" in res.output


# ----------------------------------------------------------------------------------------------
# --resume finishes what the contract requires
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lost", ["plots", "plots/train_loss.png", "summary.csv", "run.log", "config.yaml", "adapters/rank-4"]
)
def test_resume_writes_what_a_finished_run_lacks_without_running_anything(finished, tmp_path, monkeypatch, lost):
    """After a full disk (the plots, the report or an adapter never written), --resume writes them from the last
    checkpoint and metrics.jsonl, bit for bit as the run did, without loading the model or running a round."""
    run = copy_run(finished, tmp_path)

    def files() -> dict[Path, bytes]:
        return {
            p.relative_to(run): p.read_bytes()
            for p in run.rglob("*")
            if p.is_file() and p.name not in (LOCK, "run.log")
        }

    before = files()
    path = run / lost
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert not RunDir(run).is_complete(cfg())

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded: a finished run's rounds are never run again")

    monkeypatch.setattr(runner, "load_federation_model", no_model)
    runner.run(cfg(), run, resume=True, verbose=False)
    assert check_run_dir(run) == []
    assert RunDir(run).is_complete(cfg())
    assert files() == before
    assert "writing what the run lacks: " + lost.split("/")[0] in (run / "run.log").read_text()


# ----------------------------------------------------------------------------------------------
# export and report --out: never a user's files, never the run's own
# ----------------------------------------------------------------------------------------------
def error(res) -> str:
    assert res.exit_code == 2, res.output
    return res.output.strip().splitlines()[-1]


@pytest.fixture()
def home_and_cwd(tmp_path, monkeypatch) -> tuple[Path, Path]:
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home, cwd


def test_export_never_overwrites_a_users_adapter_nor_the_runs_own_files(finished, tmp_path, home_and_cwd):
    run = copy_run(finished, tmp_path)
    home, cwd = home_and_cwd
    own = {p: p.read_bytes() for p in (run / "adapters").rglob("*") if p.is_file()}

    def export(out: str | Path, *extra: str):
        return cli.invoke(app, ["export", str(run), "--rank", "2", "--out", str(out), *extra])

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "adapter_config.json").write_text("the user's own")
    assert error(export(mine)) == (
        f"error: --out {mine} already holds adapter_config.json; prelort will not overwrite them (choose another "
        "--out, or pass --force to replace them)"
    )
    assert (mine / "adapter_config.json").read_text() == "the user's own"
    assert not (mine / "adapter_model.safetensors").exists()
    assert export(mine, "--force").exit_code == 0
    assert json.loads((mine / "adapter_config.json").read_text())["r"] == 2
    assert error(export(mine)).startswith(f"error: --out {mine} already holds adapter_config.json, adapter_model")

    for out, why in [
        (run / "adapters" / "rank-4", f"is inside adapters of the run directory {run}"),
        (run / "checkpoints" / "round-2", f"is inside checkpoints of the run directory {run}"),
        (run / "plots" / "new", f"is inside plots of the run directory {run}"),
        (run, f"is the run directory {run}"),
    ]:
        assert error(export(out, "--force")) == (
            f"error: --out {out} {why}; prelort will not write into a run's own files (choose a directory outside it)"
        )
    assert {p: p.read_bytes() for p in (run / "adapters").rglob("*") if p.is_file()} == own
    assert not (run / "plots" / "new").exists() and not (run / "adapter_config.json").exists()
    assert check_run_dir(run) == []

    for out, what in [(home, "your home directory"), ("~", "your home directory"), (".", "the current directory")]:
        assert error(export(out, "--force")) == (
            f"error: --out {out} is {what}; give a directory of its own, e.g. --out adapters/NAME"
        )
    assert error(export("/", "--force")).startswith("error: --out / is the filesystem root;")
    (tmp_path / "file").write_text("")
    assert error(export(tmp_path / "file")) == f"error: --out {tmp_path / 'file'} exists and is not a directory"
    assert sorted(p.name for p in home.iterdir()) == sorted(p.name for p in cwd.iterdir()) == []
    # a new directory, or one holding other files, takes the adapter (also a new folder beside a run's own files)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("kept")
    for out in (tmp_path / "new", tmp_path / "other", run / "exported"):
        assert export(out).exit_code == 0
        assert (out / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "notes.txt").read_text() == "kept"


def test_report_never_overwrites_a_users_comparison_nor_the_runs_own_files(finished, tmp_path, home_and_cwd):
    a, b = copy_run(finished, tmp_path, "a"), copy_run(finished, tmp_path, "b")
    home, cwd = home_and_cwd

    def report(*extra: str | Path):
        return cli.invoke(app, ["report", str(a), str(b), *map(str, extra)])

    mine = tmp_path / "cmp"
    mine.mkdir()
    (mine / "comparison.md").write_text("my notes")
    assert error(report("--out", mine)) == (
        f"error: --out {mine} already holds comparison.md; prelort will not overwrite them (choose another --out, "
        "or pass --force to replace them)"
    )
    assert (mine / "comparison.md").read_text() == "my notes" and not (mine / "comparison.csv").exists()
    assert report("--out", mine, "--force").exit_code == 0
    assert (mine / "comparison.md").read_text().startswith("# Comparison")
    assert error(report("--out", mine)).startswith(f"error: --out {mine} already holds comparison.csv, comparison.md")
    # the default ./comparison too
    assert report().exit_code == 0 and (cwd / "comparison" / "comparison.csv").is_file()
    assert error(report()).startswith("error: --out comparison already holds comparison.csv, comparison.md")

    for out, why in [
        (a, f"is the run directory {a}"),
        (b / "plots", f"is inside plots of the run directory {b}"),
        (a / "eval", f"is inside eval of the run directory {a}"),
    ]:
        assert error(report("--out", out, "--force")) == (
            f"error: --out {out} {why}; prelort will not write into a run's own files (choose a directory outside it)"
        )
    assert not list(a.rglob("comparison*")) and not list(b.rglob("comparison*"))
    for out, what in [(home, "your home directory"), ("~", "your home directory"), (".", "the current directory")]:
        assert error(report("--out", out, "--force")) == (
            f"error: --out {out} is {what}; give a directory of its own, e.g. --out comparison"
        )
    assert list(home.iterdir()) == [] and [p.name for p in cwd.iterdir()] == ["comparison"]
    assert check_run_dir(a) == [] and check_run_dir(b) == []
