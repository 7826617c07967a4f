"""What the SecAgg+ run tests share: the small tiny.yaml run, the SecAgg+ settings, and continuing a SecAgg+ run's
state with the plain in-process engine (the clients train as they did, so the two differ only by SecAgg+)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from prelort import config as config_mod
from prelort import runner

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.yaml"
# tiny.yaml: 4 clients of ranks 1, 2, 4, 8, all sampled; SMALL: 64 training examples, 16 per client.
SMALL = [
    "rounds=2",
    "train.local_steps=1",
    "data.num_train=64",
    "data.num_test=8",
    "eval.max_examples=2",
    "eval.max_new_tokens=2",
    "eval.truncation_curve=false",
]
# round_timeout bounds every SecAgg+ stage: a stuck protocol fails the round instead of hanging the test
SECAGG = ["engine=flower-sim", "privacy.secure_aggregation=true", "flower.round_timeout=120"]
RANKS = (1, 2, 4, 8)


def adapter(run: Path, round_: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"round-{round_}" / "adapter.safetensors"))


def in_process_round(secure_run: Path, round_: int, out: Path, overrides: list[str]) -> Path:
    """Round ``round_`` run in-process (tiny.yaml + SMALL + ``overrides``) from ``secure_run``'s state after round
    ``round_ - 1``: a copy of its run directory, later checkpoints removed, resumed. A different run continued
    from that state, so it gets its own config.yaml (--resume refuses a changed engine or secure_aggregation in a
    run's config.yaml, as it should for a user)."""
    shutil.copytree(secure_run, out)
    for later in (out / "checkpoints").glob("round-*"):
        if int(later.name.split("-")[1]) >= round_:
            shutil.rmtree(later)
    cfg = config_mod.load(TINY, [*SMALL, *overrides, f"rounds={round_}"])
    (out / "config.yaml").write_text(cfg.to_yaml())
    return runner.run(cfg, out, resume=True, verbose=False)
