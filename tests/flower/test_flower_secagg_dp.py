"""privacy.dp together with privacy.secure_aggregation (flower-sim): each client clips its own update and uploads
it with weight 1 through SecAgg+, the server adds the Gaussian noise to the secure sums. On the same seed the
state equals central DP's (the server clips and noises the plain sums, noise from the same generator) within
SecAgg+'s quantisation bound, and the accounted epsilon is the same."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("dp_accounting")

from secagg_runs import RANKS, SECAGG, SMALL, TINY, adapter, in_process_round  # noqa: E402

from prelort import config as config_mod  # noqa: E402
from prelort import runner  # noqa: E402

# update norms on this config are 1.6 - 4.6: C = 2 clips most clients; z = 0.3 (noise std 0.6 on the sums)
DP = ["privacy.dp=true", "privacy.clip_norm=2", "privacy.noise_multiplier=0.3"]


def _trains(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.slow  # one 2-round flower-sim run and two in-process rounds: about 60 s on a quiet 2-core machine
def test_dp_with_secure_aggregation_equals_central_dp_within_the_quantisation_bound(tmp_path, check_run):
    cfg = config_mod.load(TINY, [*SMALL, *SECAGG, *DP])
    run = runner.run(cfg, tmp_path / "secure", verbose=False)
    check_run(run)
    log_text = (run / "run.log").read_text()
    assert "SecAgg+ with weight bound W=1 (privacy.dp: uniform weights)" in log_text
    # every round: 4 clients with weight rho_k = 1 -> quantisation bound per entry of N' = K (2c/Q) / K = 2c/Q
    bounds = [
        float(b)
        for b in re.findall(
            r"secure aggregation \(SecAgg\+\): 4 clients aggregated \[0, 1, 2, 3\]; "
            r"quantisation bound ([\d.e+-]+) per entry",
            log_text,
        )
    ]
    assert bounds == pytest.approx([16 / 2**22] * 2, rel=1e-6)
    assert len(re.findall(r"differential privacy: .*server noise on the SecAgg\+ sums", log_text)) == 2

    secure_eps = [(t["round"], t["dp_epsilon"], t["dp_noise_multiplier"]) for t in _trains(run)]
    assert [r for r, *_ in secure_eps] == [1, 2] and all(e > 0 for _, e, _ in secure_eps)
    assert all(re.search(rf"round {r}: privacy: epsilon={e:.6g} at delta=1e-05", log_text) for r, e, _ in secure_eps)

    # N = K N' and D = K D' are each within K * 2c/Q per entry; through (N_i + xi_i) / D_i that is at most
    # eps (1 + |x_i|) / (D_i - eps) on the new state (D_i = clients covering dimension i: 4, 3, 2, 2, 1, 1, 1, 1)
    eps = 4 * 16 / 2**22
    den = torch.tensor([sum(1 for r in RANKS if r > i) for i in range(max(RANKS))], dtype=torch.float64)
    worst = []
    for round_ in (1, 2):
        central_run = in_process_round(run, round_, tmp_path / f"central-{round_}", DP)
        assert _trains(central_run)[-1]["dp_epsilon"] == secure_eps[round_ - 1][1]
        central, secure = adapter(central_run, round_), adapter(run, round_)
        assert central.keys() == secure.keys() and len(central) == 16
        for name, x in central.items():
            d = den.view(-1, 1) if name.endswith("lora_A") else den.view(1, -1)
            limit = eps * (1 + x.double().abs()) / (d - eps) + x.double().abs() * 2**-23  # + float32 storage
            diff = (secure[name].double() - x.double()).abs()
            assert bool((diff <= limit).all()), f"round {round_} {name}: max diff {float(diff.max()):.3g}"
            worst.append(float((diff / limit).max()))
        assert any(not torch.equal(secure[n], central[n]) for n in central)  # SecAgg+ did touch the values
    assert max(worst) <= 1.0
    # the noise is there: far above the quantisation bound, the state moved from the initial one by noise std
    # 0.3 * 2 / D_i
    first, last = adapter(run, 0), adapter(run, 1)
    assert max(float((last[k] - first[k]).abs().max()) for k in first) > 0.1
