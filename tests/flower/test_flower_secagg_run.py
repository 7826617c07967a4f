"""`prelort run` with privacy.secure_aggregation: every round through Flower's SecAgg+ (flower-sim), equal to the
plain run within SecAgg+'s quantisation bound; and the settings it refuses, with their messages."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("flwr")

from secagg_runs import RANKS, SECAGG, SMALL, TINY, adapter, in_process_round  # noqa: E402

from prelort import config as config_mod  # noqa: E402
from prelort import runner  # noqa: E402
from prelort.config import ConfigError  # noqa: E402

EXAMPLES = (16, 16, 16, 16)  # SMALL: 64 training examples, 16 per client
LOG_LINE = re.compile(
    r"round (\d+): secure aggregation \(SecAgg\+\): (\d+) clients aggregated \[([\d, ]*)\]; "
    r"quantisation bound ([\d.e+-]+) per entry"
)


def _bound_per_entry(method: str, plain: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """SecAgg+'s error on the finished state: with sums N', D' each within eps of the exact (normalised) N, D,
    |N'_i/D'_i - N_i/D_i| <= eps (1 + |N_i/D_i|) / (D_i - eps). PreLort's segment rule divides dimension i by
    D_i = sum of rho_k over the clients with r_k > i; zero-padding divides everything by D_0 = sum rho = 1."""
    total = sum(EXAMPLES)
    den = torch.tensor(
        [
            sum(n / total for n, r in zip(EXAMPLES, RANKS) if r > (i if method == "prelort" else 0))
            for i in range(max(RANKS))
        ],
        dtype=torch.float64,
    )
    tol = {}
    for name, x in plain.items():
        d = den.view(-1, 1) if name.endswith("lora_A") else den.view(1, -1)
        tol[name] = eps * (1 + x.double().abs()) / (d - eps)
    return tol


@pytest.mark.parametrize("method", ["prelort", pytest.param("zeropad", marks=pytest.mark.slow)])
def test_secagg_run_on_flower_sim_equals_the_plain_run_within_the_quantisation_bound(tmp_path, method, check_run):
    """2 rounds of tiny.yaml under SecAgg+ (about 45 s). Each round is compared with the plain in-process
    round from the same starting state, entry by entry, against SecAgg+'s quantisation bound propagated
    through the method's rule - the only difference between them."""
    cfg = config_mod.load(TINY, [*SMALL, *SECAGG, f"method={method}"])
    run = runner.run(cfg, tmp_path / "secagg", verbose=False)
    check_run(run)

    log_text = (run / "run.log").read_text()
    lines = [m.groups() for m in LOG_LINE.finditer(log_text)]
    assert [(r, k, c) for r, k, c, _ in lines] == [("1", "4", "0, 1, 2, 3"), ("2", "4", "0, 1, 2, 3")], log_text
    # K = 4 clients, rho_k = 16/64 each (sum 1): eps = K * (2c / Q) / sum rho = 4 * 16 / 2**22
    eps = 4 * 16 / 2**22
    assert [float(b) for *_, b in lines] == pytest.approx([eps, eps], rel=1e-5)
    assert "dropped/failed clients: none" in log_text
    trains = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [(t["round"], t["accepted"], t["failed"]) for t in trains] == [(1, 4, 0), (2, 4, 0)]
    assert all(isinstance(t["train_loss"], float) for t in trains)

    worst = []
    for round_ in (1, 2):
        plain = adapter(in_process_round(run, round_, tmp_path / f"plain-{round_}", [f"method={method}"]), round_)
        secure = adapter(run, round_)
        assert plain.keys() == secure.keys() and len(plain) == 16
        tol = _bound_per_entry(method, plain, eps)
        for name in plain:
            diff = (secure[name].double() - plain[name].double()).abs()
            # + one float32 rounding of the stored value
            limit = tol[name] + plain[name].double().abs() * 2**-23
            assert bool((diff <= limit).all()), (
                f"round {round_} {name}: max diff {float(diff.max()):.3g}, "
                f"bound there {float(limit.flatten()[diff.argmax()]):.3g}"
            )
            worst.append(float((diff / limit).max()))
        # SecAgg+ did work on the values: not the plain state bit for bit
        assert any(not torch.equal(secure[n], plain[n]) for n in plain)
    assert max(worst) <= 1.0
    # training moved the adapter, so the comparison is not between two initial states
    first = adapter(run, 0)
    assert any(float((adapter(run, 2)[k] - first[k]).abs().max()) > 1e-5 for k in first)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["audit=true"],
            r"privacy\.secure_aggregation and audit: true cannot be combined: the audit stores every "
            r"client's update",
        ),
        (["method=flexlora"], r"privacy\.secure_aggregation: method 'flexlora' cannot run under secure aggregation"),
        (["method=hetlora"], r"method hetlora needs validation\.max_update_norm"),
        (["clients.per_round=2"], r"at least 3 clients per round"),
    ],
)
def test_refused_secagg_settings_fail_before_flower_starts(tmp_path, overrides, needle):
    cfg = config_mod.load(TINY, [*SMALL, *SECAGG, *overrides])
    with pytest.raises(ConfigError, match=needle):
        runner.run(cfg, tmp_path / "r", verbose=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_client_whose_update_fails_its_own_validation_uploads_nothing_and_the_round_goes_on(tmp_path, check_run):
    """Client updates have norms 1.6, 2.2, 3.2, 4.6 (ranks 1, 2, 4, 8) on this config: with
    validation.max_update_norm=4 the rank-8 client rejects its own update, drops out of SecAgg+ after the
    key exchange, and the other three are aggregated (SecAgg+ removes the dropped client's masks)."""
    cfg = config_mod.load(TINY, [*SMALL, *SECAGG, "rounds=1", "validation.max_update_norm=4"])
    run = runner.run(cfg, tmp_path / "secagg", verbose=False)
    check_run(run)
    log_text = (run / "run.log").read_text()
    assert [m.groups()[:3] for m in LOG_LINE.finditer(log_text)] == [("1", "3", "0, 1, 2")], log_text
    assert re.search(
        r"WARNING round 1: client 3 is not in the secure sum: client 3 did not upload to SecAgg\+: "
        r"UpdateRejected: norm_too_large: client 3: update norm [\d.]+ exceeds the bound 4 "
        r"\(validation\.max_update_norm\)\n",
        log_text,
    )
    assert "dropped/failed clients: [3]" in log_text
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [(t["round"], t["accepted"], t["failed"]) for t in train] == [(1, 3, 1)]
