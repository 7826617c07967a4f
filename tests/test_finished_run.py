"""What a finished run leaves, and who may read and write it (issue 26): `prelort check` verifies every
checkpoint's checksums, `--resume` finishes whatever the contract still lacks, and `export` / `report --out`
never overwrite a user's files or the run's own."""

from __future__ import annotations

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


def copy_run(finished: Path, tmp_path: Path) -> Path:
    # without the lock: this process holds the original's, and would find its copy held by a live process
    return Path(shutil.copytree(finished, tmp_path / "run", ignore=shutil.ignore_patterns(LOCK)))


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
