"""DP under secure aggregation at the Federation level, without the Flower runtime: the clients' encodings
(clipped to privacy.clip_norm, weight 1) summed as SecAgg+ would hand them over, finished by
Federation.end_round_secure, equal central DP's Federation.end_round with the same seed (same noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dp_accounting")

from prelort import config as config_mod  # noqa: E402
from prelort.federation import Federation  # noqa: E402
from prelort.methods import ClientUpdate  # noqa: E402
from prelort.privacy import clip_update  # noqa: E402
from prelort.protocol import SecureAggregate  # noqa: E402
from prelort.rank_geometry import adapter_prefix, adapter_rank  # noqa: E402
from prelort.secure_sums import WEIGHT_UNITS, SecAggLayout, encode_for_secagg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}
DP = ("privacy.dp=true", "privacy.clip_norm=0.05", "privacy.noise_multiplier=0.7")


def cfg(*overrides: str) -> config_mod.Config:
    return config_mod.load(ROOT / "examples" / "tiny.yaml", list(overrides))


def updates(fed: Federation) -> list[ClientUpdate]:
    out = []
    for task in fed.begin_round(1):
        gen = torch.Generator().manual_seed(100 + task.client)
        # client k moves by 0.01 * k-ish: some above the clip norm 0.05, some below
        tensors = {
            k: (v + 0.004 * (1 + task.client) * torch.randn(tuple(v.shape), generator=gen)).contiguous()
            for k, v in task.broadcast.adapter.items()
        }
        rank = adapter_rank(task.broadcast.adapter)
        out.append(ClientUpdate(task.client, rank, 10 + task.client, tensors, 1, fed.cfg.method, {"loss": 1.0}))
    return out


def secure_sums(fed: Federation, ups: list[ClientUpdate]) -> SecureAggregate:
    """What SecAgg+ hands the server (exactly, without quantisation): the mean of the clients' uploads, each
    clipped by the client against the adapter it received and encoded with weight 1 (rho_k = 1)."""
    layout = SecAggLayout.of(fed.state)
    uploads = []
    for u in ups:
        clipped, _, _ = clip_update(
            u, adapter_prefix(fed._tasks[u.client].broadcast.adapter, u.rank), fed.cfg.privacy.clip_norm
        )
        arrays, weight = encode_for_secagg(fed.method, clipped, layout, uniform_weight=True)
        assert weight == 1.0
        uploads.append([a.astype(np.float64) for a in arrays])
    mean = [sum(parts) / len(uploads) for parts in zip(*uploads)]
    return SecureAggregate(
        mean, clients=[(u.client, {"loss": 1.0}) for u in ups], weight_units=[WEIGHT_UNITS] * len(ups)
    )


@pytest.mark.parametrize("method", ["prelort", "zeropad", "hetlora"])
def test_noise_on_the_secure_sums_equals_central_dp(tmp_path, method):
    central = Federation(cfg(*DP, f"method={method}"), tmp_path / "c", MODULES)
    central.start()
    ups = updates(central)
    central.end_round(1, ups)

    secure = Federation(
        cfg(*DP, f"method={method}", "engine=flower-sim", "privacy.secure_aggregation=true"), tmp_path / "s", MODULES
    )
    secure.start()
    secure.begin_round(1)
    secure.end_round_secure(1, secure_sums(secure, ups))

    noiseless = Federation(cfg(*DP[:2], "privacy.noise_multiplier=0", f"method={method}"), tmp_path / "n", MODULES)
    noiseless.start()
    noiseless.end_round(1, updates(noiseless))
    for k, x in central.state.tensors.items():
        # float32 uploads: the sums agree to float32 rounding
        torch.testing.assert_close(secure.state.tensors[k], x, atol=2e-6, rtol=1e-5)
        assert not torch.allclose(x, noiseless.state.tensors[k], atol=1e-3), "the noise is there"
    assert secure.privacy_record(1) == central.privacy_record(1)
    assert central.privacy_record(1)["dp_noise_multiplier"] == 0.7
