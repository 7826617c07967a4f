"""The round loop end to end on tiny-llama (issue 4): every method, audit recomputation, resume, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prelort import config as config_mod
from prelort.data import CATEGORIES
from prelort.runner import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
METHODS = ["prelort", "fedit", "zeropad", "hetlora", "flexlora", "flora"]

# smaller than tiny.yaml so six methods x a few runs stay fast
FAST = [
    "rounds=2",
    "train.local_steps=2",
    "data.num_train=96",
    "data.num_test=16",
    "eval.max_examples=8",
    "eval.max_new_tokens=4",
]


def tiny_cfg(*overrides: str) -> config_mod.Config:
    return config_mod.load(TINY, [*FAST, *overrides])


@pytest.fixture(scope="module")
def audited_runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for m in METHODS:
        d = tmp_path_factory.mktemp(m) / "run"
        run(tiny_cfg(f"method={m}", "audit=true"), d, verbose=False)
        out[m] = d
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_leaves_the_whole_run_directory(audited_runs, method, check_run):
    d = audited_runs[method]
    check_run(d)
    for name in ("config.yaml", "metrics.jsonl", "summary.csv", "run.log"):
        assert (d / name).is_file(), name
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["round-0", "round-1", "round-2"]
    assert sorted(p.name for p in (d / "adapters").iterdir()) == ["rank-1", "rank-2", "rank-4", "rank-8"]
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert all({"round", "rank", "accuracy", "rougeL", "perplexity"} <= r.keys() for r in recs)
    base = [r for r in recs if r["rank"] == "base"]
    assert len(base) == 1 and base[0]["round"] == 0
    tiers = {(r["round"], r["rank"]) for r in recs if r.get("kind") == "tier"}
    assert tiers == {(rd, t) for rd in (1, 2) for t in (1, 2, 4, 8)}
    curve = sorted(r["rank"] for r in recs if r.get("kind") == "curve")
    assert curve == [1, 2, 4, 8]
    for r in recs:
        if r["accuracy"] is not None:
            assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["perplexity"])
            assert r["mode"] == "teacher_forced" and r["rougeL"] is None  # builtin answers are short
            assert set(r["category_accuracy"]) <= set(CATEGORIES)
    # every evaluated example, per round and tier: base in round 0, tiers each round, the curve in the last
    lines = {
        rd: [json.loads(l) for l in (d / "eval" / f"round-{rd}.jsonl").read_text().splitlines()] for rd in (0, 1, 2)
    }
    assert sorted(p.name for p in (d / "eval").iterdir()) == ["round-0.jsonl", "round-1.jsonl", "round-2.jsonl"]
    evals = [r for r in recs if r.get("kind") in ("base", "tier", "curve")]
    for r in evals:
        mine = [x for x in lines[r["round"]] if (x["kind"], x["rank"]) == (r["kind"], r["rank"])]
        assert len(mine) == r["n"] and sum(x["correct"] for x in mine) / r["n"] == pytest.approx(r["accuracy"])
        assert math.exp(-sum(x["loglik"] for x in mine) / sum(x["n_tokens"] for x in mine)) == pytest.approx(
            r["perplexity"], rel=1e-6
        )
    keys = {"round", "rank", "kind", "id", "category", "correct", "loglik", "n_tokens", "prediction"}
    assert all(set(x) == keys and x["prediction"] is None for rd in lines for x in lines[rd])
    ids = [x["id"] for x in lines[1] if x["rank"] == 1]
    assert ids == [x["id"] for x in lines[2] if x["rank"] == 8 and x["kind"] == "tier"]  # same examples, same order
    train = [r for r in recs if r.get("kind") == "train"]
    assert [r["accepted"] for r in train] == [4, 4]
    assert all(math.isfinite(r["train_loss"]) for r in train)
    # the global adapter actually moved (training happened and was aggregated)
    a0 = load_file(str(d / "checkpoints/round-0/adapter.safetensors"))
    a2 = load_file(str(d / "checkpoints/round-2/adapter.safetensors"))
    assert a0.keys() == a2.keys()
    assert any(not torch.equal(a0[k], a2[k]) for k in a0)


def _updates(run_dir: Path, rnd: int):
    out = []
    for f in sorted((run_dir / f"updates/round-{rnd}").glob("client-*.safetensors")):
        meta = json.loads(f.with_suffix(".json").read_text())
        out.append((meta, load_file(str(f))))
    return out


def _modules(state: dict) -> list[str]:
    return sorted({k.rpartition(".")[0] for k in state})


def recompute(method: str, prev: dict, ups, alpha: float, R: int) -> dict:
    """Each method's rule written out independently of prelort.methods (docs/design.md section 2-3)."""
    s = alpha / R
    out = {}
    for m in _modules(prev):
        if method in ("prelort", "zeropad", "hetlora", "fedit"):
            A, B = prev[f"{m}.lora_A"].double(), prev[f"{m}.lora_B"].double()
            newA, newB = A.clone(), B.clone()
            if method == "hetlora":
                w = []
                for _, t in ups:
                    w.append(
                        math.sqrt(
                            sum(
                                float(((t[f"{mm}.lora_B"].double() @ t[f"{mm}.lora_A"].double()) ** 2).sum())
                                for mm in _modules(prev)
                            )
                        )
                    )
            else:
                w = [meta["num_examples"] for meta, _ in ups]
            for i in range(A.shape[0]):
                if method == "prelort":
                    members = [(p, t) for p, (meta, t) in zip(w, ups) if meta["rank"] > i]
                    if not members:
                        continue
                    tot = sum(p for p, _ in members)
                else:  # zero padding (fedit: all ranks equal): every client counts, missing dims are zeros
                    members = [(p, t) for p, (meta, t) in zip(w, ups) if meta["rank"] > i]
                    tot = sum(w)
                newA[i] = sum(p * t[f"{m}.lora_A"][i].double() for p, t in members) / tot
                newB[:, i] = sum(p * t[f"{m}.lora_B"][:, i].double() for p, t in members) / tot
            out[f"{m}.lora_A"], out[f"{m}.lora_B"] = newA.float(), newB.float()
        else:
            w = [meta["num_examples"] for meta, _ in ups]
            tot = sum(w)
            avg = sum(
                (p / tot) * s * (t[f"{m}.lora_B"].double() @ t[f"{m}.lora_A"].double()) for p, (_, t) in zip(w, ups)
            )
            if method == "flexlora":
                out[f"{m}.delta"] = avg.float()
            else:  # flora: stacking == weighted sum of products, merged into the accumulated delta
                out[f"{m}.delta"] = (prev[f"{m}.delta"].double() + avg).float()
    return out


@pytest.mark.parametrize("method", METHODS)
def test_audit_recomputes_each_round_from_disk(audited_runs, method):
    d = audited_runs[method]
    cfg = config_mod.load(d / "config.yaml")
    R = max(cfg.clients.ranks)
    for rnd in (1, 2):
        prev = load_file(str(d / f"checkpoints/round-{rnd - 1}/adapter.safetensors"))
        ups = _updates(d, rnd)
        assert len(ups) == cfg.clients.per_round
        got = load_file(str(d / f"checkpoints/round-{rnd}/adapter.safetensors"))
        want = recompute(method, prev, ups, cfg.lora.alpha, R)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=f"{method} round {rnd} {k}")


def test_resume_after_round_1_is_bit_identical(tmp_path, check_run):
    full = tmp_path / "full"
    run(tiny_cfg("method=prelort", "rounds=3"), full, verbose=False)
    part = tmp_path / "part"
    run(tiny_cfg("method=prelort", "rounds=1"), part, verbose=False)
    # same run continued: only `rounds` may change on resume
    run(tiny_cfg("method=prelort", "rounds=3"), part, resume=True, verbose=False)
    a = load_file(str(full / "checkpoints/round-3/adapter.safetensors"))
    b = load_file(str(part / "checkpoints/round-3/adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    check_run(part)
    rounds = [
        json.loads(l)["round"]
        for l in (part / "metrics.jsonl").read_text().splitlines()
        if json.loads(l).get("kind") == "train"
    ]
    assert rounds == [1, 2, 3]
    # per-example records: the resumed run's files equal the uninterrupted run's, without duplicates
    for rd in (2, 3):
        assert (part / f"eval/round-{rd}.jsonl").read_text() == (full / f"eval/round-{rd}.jsonl").read_text()
    for f in (part / "eval").iterdir():
        keys = [(x["kind"], x["rank"], x["id"]) for x in map(json.loads, f.read_text().splitlines())]
        assert len(keys) == len(set(keys)), f.name


def test_new_run_refuses_to_overwrite(tmp_path):
    d = tmp_path / "r"
    run(tiny_cfg("rounds=1", "eval.truncation_curve=false", "eval.base=false"), d, verbose=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run(tiny_cfg("rounds=1"), d, verbose=False)
