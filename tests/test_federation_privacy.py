"""Differential privacy and secure aggregation settings in the round loop (Federation level, no training)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from prelort import config as config_mod
from prelort.config import ConfigError
from prelort.federation import Federation
from prelort.methods import ClientUpdate
from prelort.privacy import PrivacyError
from prelort.rank_geometry import adapter_rank

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}


def cfg(*overrides: str) -> config_mod.Config:
    return config_mod.load(ROOT / "examples" / "tiny.yaml", list(overrides))


def one_round(fed: Federation, scale: float = 0.01) -> dict[str, torch.Tensor]:
    fed.start()
    results = []
    for task in fed.begin_round(1):
        r = adapter_rank(task.broadcast.adapter)
        gen = torch.Generator().manual_seed(100 + task.client)
        tensors = {
            k: (v + scale * torch.randn(tuple(v.shape), generator=gen)).contiguous()
            for k, v in task.broadcast.adapter.items()
        }
        results.append(ClientUpdate(task.client, r, 10, tensors, task.round, fed.cfg.method, {}))
    fed.end_round(1, results)
    return {k: v.clone() for k, v in fed.state.tensors.items()}


def test_dp_rounds_are_noised_deterministically_and_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("prelort"), "propagate", True)
    dp = ("privacy.dp=true", "privacy.clip_norm=0.05", "privacy.noise_multiplier=1.0")
    with caplog.at_level(logging.INFO, logger="prelort"):
        a = one_round(Federation(cfg(*dp), tmp_path / "a", MODULES))
    assert "differential privacy" in caplog.text and "noise_std" in caplog.text
    b = one_round(Federation(cfg(*dp), tmp_path / "b", MODULES))
    plain = one_round(Federation(cfg(), tmp_path / "c", MODULES))
    for k in a:
        assert torch.equal(a[k], b[k]), "same seed, same noise"
    # noise of std z*C/count on the covered dims makes the result differ from the plain aggregate
    assert any(not torch.allclose(a[k], plain[k], atol=1e-4) for k in a)


def test_dp_without_noise_and_a_loose_clip_is_the_uniform_weight_aggregate(tmp_path):
    loose = one_round(
        Federation(
            cfg("privacy.dp=true", "privacy.clip_norm=1e6", "privacy.noise_multiplier=0"), tmp_path / "a", MODULES
        )
    )
    plain = one_round(Federation(cfg(), tmp_path / "b", MODULES))  # every client reports 10 examples: uniform
    for k in loose:
        torch.testing.assert_close(loose[k], plain[k], atol=1e-6, rtol=1e-6)


def test_dp_is_refused_for_methods_without_a_sum_form(tmp_path):
    with pytest.raises(PrivacyError, match="flexlora"):
        Federation(cfg("method=flexlora", "privacy.dp=true"), tmp_path, MODULES)


@pytest.mark.parametrize(
    "method, needle",
    [("flora", "cannot run under secure aggregation"), ("prelort", "needs engine flower-sim or flower")],
)
def test_secure_aggregation_is_refused_with_a_reason(tmp_path, method, needle):
    with pytest.raises(ConfigError, match=needle):
        Federation(cfg(f"method={method}", "privacy.secure_aggregation=true"), tmp_path, MODULES)


def test_a_secure_round_is_finished_from_the_sums_and_fails_when_too_few_are_in_them(tmp_path, caplog, monkeypatch):
    """Federation.end_round_secure on the exact weighted mean of the clients' SecAgg+ encodings gives the
    method's plain aggregate; a halted protocol or too few clients in the sum fails the round; a Federation
    under secure aggregation refuses individual updates."""
    pytest.importorskip("numpy")
    from prelort.federation import RoundFailed
    from prelort.protocol import SecureAggregate
    from prelort.secure_sums import WEIGHT_UNITS, SecAggLayout, encode_for_secagg, weight_units

    secure = ("engine=flower-sim", "privacy.secure_aggregation=true", "clients.min_per_round=3")
    monkeypatch.setattr(logging.getLogger("prelort"), "propagate", True)
    plain = Federation(cfg(), tmp_path / "plain", MODULES)
    fed = Federation(cfg(*secure), tmp_path / "secure", MODULES)
    updates = []
    for f in (plain, fed):
        f.start()
        tasks = f.begin_round(1)
    for task in tasks:
        gen = torch.Generator().manual_seed(100 + task.client)
        tensors = {
            k: (v + 0.01 * torch.randn(tuple(v.shape), generator=gen)).contiguous()
            for k, v in task.broadcast.adapter.items()
        }
        rank = adapter_rank(task.broadcast.adapter)
        updates.append(
            ClientUpdate(task.client, rank, 8 * (task.client + 1), tensors, 1, "prelort", {"loss": 1.0 + task.client})
        )
    layout = SecAggLayout.of(fed.state)
    uploads = [encode_for_secagg(fed.method, u, layout) for u in updates]
    units = [weight_units(w, 80) for _, w in uploads]  # W = 80 = all examples: 8+16+24+32
    rho = [n / WEIGHT_UNITS for n in units]
    mean = [
        sum(r * up[i].astype("float64") for (up, _), r in zip(uploads, rho)) / sum(rho)
        for i in range(len(layout.names) + 1)
    ]
    with pytest.raises(RuntimeError, match="must return a SecureAggregate"):
        fed.end_round(1, updates)
    with pytest.raises(
        RoundFailed,
        match=r"round 1: 0 accepted update\(s\) from 4 sampled clients under SecAgg\+ "
        r"\(4 dropped or failed; the protocol halted\)",
    ):
        fed.end_round_secure(1, SecureAggregate(None, failed={c: "gone" for c in range(4)}))
    with pytest.raises(RoundFailed, match="2 accepted update"):
        fed.end_round_secure(
            1, SecureAggregate(mean, clients=[(0, {}), (1, {})], weight_units=units[:2], failed={2: "x", 3: "y"})
        )
    with caplog.at_level(logging.INFO, logger="prelort"):
        outcome = fed.end_round_secure(
            1, SecureAggregate(mean, clients=[(u.client, u.meta) for u in updates], weight_units=units)
        )
    assert outcome.accepted == [0, 1, 2, 3] and outcome.failed == {} and outcome.train_loss == 2.5
    assert "round 1: secure aggregation (SecAgg+): 4 clients aggregated [0, 1, 2, 3]; quantisation bound" in caplog.text
    plain.end_round(1, updates)
    for k, v in plain.state.tensors.items():
        torch.testing.assert_close(fed.state.tensors[k], v, rtol=0, atol=1e-6)
    assert (tmp_path / "secure" / "checkpoints" / "round-1").is_dir() and fed.round == 1
