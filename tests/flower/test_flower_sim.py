"""engine: flower-sim (Flower's simulation runtime) gives the same federation as engine: inprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from prelort import config as config_mod  # noqa: E402
from prelort import runner  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.yaml"
# tiny.yaml, smaller: 2 rounds so round 2 starts from an aggregated state; little evaluation
SMALL = [
    "rounds=2",
    "train.local_steps=1",
    "data.num_train=64",
    "data.num_test=8",
    "eval.max_examples=2",
    "eval.max_new_tokens=2",
    "eval.truncation_curve=false",
]


def check_run(run_dir: Path) -> None:
    from prelort.check import check_run_dir

    problems = check_run_dir(run_dir)
    assert not problems, "\n".join(problems)


def test_flower_sim_matches_inprocess_and_writes_a_valid_run_dir(tmp_path, monkeypatch):
    # both engines at one torch thread (the simulation's client actors inherit OMP_NUM_THREADS): with different
    # thread counts float reductions split differently and the adapters differ by ~1e-5 after two rounds
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    ref = runner.run(config_mod.load(TINY, SMALL), tmp_path / "inprocess", verbose=False)
    sim = runner.run(config_mod.load(TINY, [*SMALL, "engine=flower-sim"]), tmp_path / "flower-sim", verbose=False)
    check_run(sim)

    for r in (0, 1, 2):
        a = load_file(str(ref / "checkpoints" / f"round-{r}" / "adapter.safetensors"))
        b = load_file(str(sim / "checkpoints" / f"round-{r}" / "adapter.safetensors"))
        assert a.keys() == b.keys() and len(a) == 16  # tiny-llama: 2 layers x q,k,v,o x A,B
        for k in a:
            assert a[k].shape == b[k].shape
            assert float((a[k] - b[k]).abs().max()) <= 1e-6, f"round {r} {k} differs"
    first = load_file(str(ref / "checkpoints" / "round-0" / "adapter.safetensors"))
    assert any(float((a[k] - first[k]).abs().max()) > 1e-5 for k in a), "training did not move the adapter"

    trains = [json.loads(x) for x in (sim / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [(t["round"], t["accepted"], t["failed"], t["rejected"]) for t in trains] == [(1, 4, 0, 0), (2, 4, 0, 0)]
    ref_trains = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [t["train_loss"] for t in trains] == pytest.approx([t["train_loss"] for t in ref_trains], abs=1e-6)
    assert config_mod.load(sim / "config.yaml").engine == "flower-sim"


def test_flower_sim_refuses_an_existing_run_dir_before_starting_flower(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        runner.run(config_mod.load(TINY, [*SMALL, "engine=flower-sim"]), tmp_path / "run", verbose=False)


@pytest.mark.slow
def test_a_failing_serverapp_raises_with_the_root_cause(tmp_path):
    from prelort.apps.launch import FlowerRunError

    cfg = config_mod.load(TINY, [*SMALL, "engine=flower-sim", f"data.source={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(FlowerRunError, match=r"finished:failed.*DataError: data.source .*missing.jsonl"):
        runner.run(cfg, tmp_path / "run", verbose=False)
