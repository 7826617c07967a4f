"""RunDir, the run directory's owner (docs/design.md sections 7-8), tested on its own: no model is loaded.

Its file names, the eval files (a re-evaluated tier replaces its lines; rounds after a resumed checkpoint are
dropped), metrics.jsonl (records by key, truncation on resume), completeness, and config loading errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prelort import config as config_mod
from prelort.checkpoint import save_checkpoint
from prelort.methods.base import GlobalState
from prelort.rundir import FINISHED_RUN_PLOTS, RunDir, expected_records, train_record

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
EXAMPLES = [
    {"id": "a", "category": "c", "correct": 1, "loglik": -0.5, "n_tokens": 2, "prediction": None},
    {"id": "b", "category": "c", "correct": 0, "loglik": -3.0, "n_tokens": 2, "prediction": None},
]


def tiny_cfg(*overrides: str) -> config_mod.Config:
    return config_mod.load(TINY, ["rounds=2", "clients.ranks=[2, 2, 4, 8]", *overrides])


def test_the_files_of_a_run_directory(tmp_path):
    run = RunDir(tmp_path)
    named = {
        run.marker: ".prelort-run",
        run.lock_file: ".prelort.lock",
        run.config_file: "config.yaml",
        run.log_file: "run.log",
        run.metrics_file: "metrics.jsonl",
        run.summary_csv: "summary.csv",
        run.plots_dir: "plots",
        run.eval_file(3): "eval/round-3.jsonl",
        run.checkpoints_dir: "checkpoints",
        run.checkpoint_dir(2): "checkpoints/round-2",
        run.adapter_dir(4): "adapters/rank-4",
        run.update_stem(1, 7): "updates/round-1/client-7",
    }
    assert {p.relative_to(tmp_path).as_posix(): rel for p, rel in named.items()} == {rel: rel for rel in named.values()}
    assert not any(tmp_path.iterdir())  # naming a file creates nothing


def test_eval_examples_are_replaced_not_appended_and_dropped_after_the_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    ex = EXAMPLES
    run.write_eval_examples(2, 4, "tier", ex)
    run.write_eval_examples(2, 8, "tier", ex)
    run.write_eval_examples(2, 4, "tier", ex[:1])  # a re-evaluation (resume) of the same tier
    lines = [json.loads(l) for l in run.eval_file(2).read_text().splitlines()]
    assert [(x["rank"], x["id"]) for x in lines] == [(8, "a"), (8, "b"), (4, "a")]
    assert lines[0] == {"round": 2, "rank": 8, "kind": "tier", **ex[0]}
    assert run.read_eval_examples(2, "tier", 8) == ex  # without round, rank and kind: what write takes
    assert run.read_eval_examples(2, "curve", 8) == [] and run.read_eval_examples(5, "tier", 8) == []
    run.write_eval_examples(3, 4, "tier", ex)
    run.write_eval_examples(10, 4, "tier", ex)
    assert list(run.read_eval_records()) == [10, 2, 3]  # file-name order
    assert [r["id"] for r in run.read_eval_records()[2]] == ["a", "b", "a"]
    run.drop_eval_after(2)
    assert sorted(p.name for p in run.eval_dir.iterdir()) == ["round-2.jsonl"]


def test_an_evaluation_goes_to_metrics_jsonl_and_its_examples_to_the_eval_file(tmp_path):
    run = RunDir(tmp_path)
    rec = run.write_evaluation(
        1, 4, "tier", {"accuracy": 0.5, "rougeL": None, "perplexity": 3.0}, EXAMPLES, "prelort", 0
    )
    assert rec == {
        "round": 1,
        "rank": 4,
        "kind": "tier",
        "accuracy": 0.5,
        "rougeL": None,
        "perplexity": 3.0,
        "method": "prelort",
        "seed": 0,
    }
    assert run.metrics_file.read_text() == json.dumps(rec) + "\n"
    assert run.read_eval_examples(1, "tier", 4) == EXAMPLES


def test_metrics_records_by_key_and_truncation_on_resume(tmp_path):
    run = RunDir(tmp_path)
    log = run.metrics
    assert log.records() == [] and log.records_by_key(1) == {}
    cfg = tiny_cfg()
    for round_ in (1, 2, 3):
        log.write(train_record(cfg, round_, {"train_loss": 1.0 / round_}))
        log.write({"round": round_, "rank": 4, "kind": "tier", "accuracy": 0.1 * round_})
    log.write({"round": 2, "rank": 4, "kind": "tier", "accuracy": 0.9})  # a second record of the same key
    with run.metrics_file.open("a") as f:
        f.write('{"round": 2, "rank": 8, "ki')  # a line cut by a crash
    have = log.records_by_key(2)
    assert set(have) == {("train", None), ("tier", 4)}
    assert have[("tier", 4)]["accuracy"] == pytest.approx(0.2)  # the first one
    assert have[("train", None)]["train_loss"] == 0.5 and have[("train", None)]["rank"] is None
    log.truncate_after(2)
    assert [(r["round"], r["kind"]) for r in log.records()] == [
        (1, "train"),
        (1, "tier"),
        (2, "train"),
        (2, "tier"),
        (2, "tier"),
    ]
    assert run.metrics_file.read_text().endswith("}\n")  # the cut line is gone


def _finished_run(tmp_path: Path, cfg: config_mod.Config) -> RunDir:
    """What a finished run of ``cfg`` leaves for completeness: checkpoints, records, adapters, summary.csv, plots,
    run.log, config.yaml."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    state = GlobalState(tensors={"m.lora_A": torch.zeros(8, 4), "m.lora_B": torch.zeros(4, 8)})
    info = {
        "method": cfg.method,
        "modules": {"m": [4, 4]},
        "client_ranks": cfg.clients.all_ranks(),
        "alpha": cfg.lora.alpha,
    }
    for round_ in range(cfg.rounds + 1):
        save_checkpoint(run.path, round_, state, info)
        for kind, rank in expected_records(cfg, round_):
            run.metrics.write({"round": round_, "rank": rank, "kind": kind})
    for t in sorted(set(cfg.clients.all_ranks())):
        run.adapter_dir(t).mkdir(parents=True)
        (run.adapter_dir(t) / "adapter_model.safetensors").write_bytes(b"")
    run.summary_csv.write_text("")
    run.plots_dir.mkdir()
    for name in FINISHED_RUN_PLOTS:
        (run.plots_dir / name).write_bytes(b"")
    run.log_file.write_text("")
    run.write_config(cfg)
    return run


def test_expected_records_of_a_round():
    cfg = tiny_cfg("eval.every=2", "rounds=3")
    assert expected_records(cfg, 0) == [("base", "base")]
    assert expected_records(cfg, 1) == [("train", None)]
    assert expected_records(cfg, 2) == [("train", None), ("tier", 2), ("tier", 4), ("tier", 8)]
    assert expected_records(cfg, 3) == [
        ("train", None),
        ("tier", 2),
        ("tier", 4),
        ("tier", 8),
        ("curve", 1),
        ("curve", 2),
        ("curve", 4),
        ("curve", 8),
    ]
    assert expected_records(tiny_cfg("eval.base=false", "eval.truncation_curve=false"), 0) == []
    assert ("curve", 1) not in expected_records(tiny_cfg("eval.truncation_curve=false"), 2)


def test_a_run_is_complete_only_with_everything_its_last_round_leaves(tmp_path):
    cfg = tiny_cfg()
    run = _finished_run(tmp_path, cfg)
    assert run.is_complete(cfg)
    assert not run.is_complete(tiny_cfg("rounds=3"))  # an extended run is not finished
    assert not RunDir(tmp_path / "nowhere").is_complete(cfg)

    lines = run.metrics_file.read_text().splitlines()
    assert json.loads(lines[-1]) == {"round": 2, "rank": 8, "kind": "curve"}
    run.metrics_file.write_text("".join(l + "\n" for l in lines[:-1]))
    assert not run.is_complete(cfg)  # the last curve record is missing
    run.metrics_file.write_text("".join(l + "\n" for l in lines))
    assert run.is_complete(cfg)

    run.summary_csv.unlink()
    assert not run.is_complete(cfg)
    run.summary_csv.write_text("")
    (run.adapter_dir(8) / "adapter_model.safetensors").unlink()
    assert not run.is_complete(cfg)
    assert run.rounds_complete(cfg)  # only what is written from the rounds is missing


def test_a_run_without_its_plots_run_log_or_config_is_not_complete(tmp_path):
    cfg = tiny_cfg()
    run = _finished_run(tmp_path, cfg)
    for path in (run.plots_dir / "train_loss.png", run.log_file, run.config_file):
        content = path.read_bytes()
        path.unlink()
        assert not run.is_complete(cfg) and run.rounds_complete(cfg)
        assert run.missing_outputs(cfg) == [path]
        path.write_bytes(content)
    assert run.is_complete(cfg)
    # a run with noise (privacy.dp) also draws its epsilon per round
    lines = run.metrics_file.read_text().splitlines()
    train = next(i for i, line in enumerate(lines) if json.loads(line) == {"round": 2, "rank": None, "kind": "train"})
    lines[train] = json.dumps({"round": 2, "rank": None, "kind": "train", "dp_epsilon": 3.5})
    run.metrics_file.write_text("".join(line + "\n" for line in lines))
    assert run.missing_outputs(cfg) == [run.plots_dir / "privacy_epsilon.png"]


def test_a_damaged_last_checkpoint_is_not_complete(tmp_path):
    cfg = tiny_cfg()
    run = _finished_run(tmp_path, cfg)
    (run.checkpoint_dir(cfg.rounds) / "adapter.safetensors").write_bytes(b"damaged")
    assert not run.is_complete(cfg)  # falls back to round 1, which is redone
    for round_ in run.checkpoint_rounds():
        (run.checkpoint_dir(round_) / "adapter.safetensors").write_bytes(b"damaged")
    assert not run.is_complete(cfg)  # every checkpoint damaged: resume says so itself


def test_config_loading_and_its_errors(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"run is not a prelort run directory \(no config.yaml\)"):
        run.load_config()
    assert run.read_config_data() is None
    assert not run.config_matches(tiny_cfg())

    run.path.mkdir()
    run.write_config(tiny_cfg())
    assert run.load_config() == tiny_cfg()
    assert run.read_config_data() == tiny_cfg().to_dict()
    assert run.config_matches(tiny_cfg())
    assert not run.config_matches(tiny_cfg("eval.base=false"))
    assert run.config_matches(tiny_cfg("eval.base=false"), ignore=("eval.base",))

    run.config_file.write_text("train: {lr: -1}\n")
    with pytest.raises(config_mod.ConfigError, match="train.lr"):
        run.load_config()
    with pytest.raises(config_mod.ConfigError) as e:
        run.load_saved_config()
    assert str(e.value).startswith("--resume: the run's config.yaml is not a valid prelort config (")
    assert "\n" not in str(e.value) and str(e.value).endswith("; restore it or start a new run")

    run.config_file.write_text("seed: [unclosed\n")
    import yaml

    with pytest.raises(yaml.YAMLError):
        run.read_config_data()
    with pytest.raises(config_mod.ConfigError) as e:
        run.load_saved_config()
    assert "\n" not in str(e.value)
