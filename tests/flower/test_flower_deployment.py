"""engine: flower on a real deployment: a SuperLink and 2 SuperNodes on loopback, TLS + SuperNode
authentication, started as subprocesses; an unregistered SuperNode is refused.

Hard time bound: a watchdog kills every process this test started after TIME_LIMIT seconds, and the
processes are stopped (process groups: Flower's SuperExec / ClientApp children included) even on failure.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("cryptography")

from prelort import config as config_mod  # noqa: E402
from prelort import runner  # noqa: E402
from prelort.apps.launch import (  # noqa: E402
    flwr_executable,
    free_port,
    wait_healthy,
    write_connection,
)
from prelort.flower.certs import make_certificates  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.yaml"
TIME_LIMIT = 300.0


def test_two_authenticated_supernodes_run_two_rounds_and_an_unregistered_one_is_refused(tmp_path, processes):
    t0 = time.monotonic()
    creds = make_certificates(tmp_path / "certs", supernodes=3)
    home, port = tmp_path / "flwr-home", free_port()
    write_connection(home, "prelort", f"127.0.0.1:{port}", insecure=False, root_certificates=str(creds.ca_cert))
    link, link_log = processes.start(
        "superlink",
        [
            flwr_executable("flower-superlink"),
            "--ssl-ca-certfile",
            str(creds.ca_cert),
            "--ssl-certfile",
            str(creds.server_cert),
            "--ssl-keyfile",
            str(creds.server_key),
            "--enable-supernode-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
    )
    wait_healthy(
        f"https://127.0.0.1:{port}/health",
        link,
        60,
        link_log,
        context=ssl.create_default_context(cafile=str(creds.ca_cert)),
    )

    for _private, public in creds.supernode_keys[:2]:  # register two of the three keys
        reg = subprocess.run(
            [flwr_executable("flwr"), "supernode", "register", str(public), "prelort"],
            env=processes.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert reg.returncode == 0, reg.stdout + reg.stderr
    for k, (private, _) in enumerate(creds.supernode_keys[:2]):
        processes.start(
            f"supernode-{k}",
            [
                flwr_executable("flower-supernode"),
                "--root-certificates",
                str(creds.ca_cert),
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
                "--auth-supernode-private-key",
                str(private),
                "--node-config",
                f"partition-id={k} num-partitions=2",
            ],
        )
    intruder, intruder_log = processes.start(
        "supernode-unregistered",
        [
            flwr_executable("flower-supernode"),
            "--root-certificates",
            str(creds.ca_cert),
            "--superlink",
            f"127.0.0.1:{port}",
            "--port",
            str(free_port()),
            "--auth-supernode-private-key",
            str(creds.supernode_keys[2][0]),
            "--node-config",
            "partition-id=1 num-partitions=2",
        ],
    )

    cfg = config_mod.load(
        TINY,
        [
            "engine=flower",
            "rounds=2",
            "clients.num=2",
            "clients.per_round=2",
            "clients.ranks=[2, 4]",
            "train.local_steps=1",
            "data.num_train=32",
            "data.num_test=8",
            "eval.max_examples=2",
            "eval.max_new_tokens=2",
            "eval.truncation_curve=false",
            "eval.base=false",
            f"flower.superlink=127.0.0.1:{port}",
            f"flower.root_certificates={creds.ca_cert}",
            "flower.round_timeout=120",
            "flower.node_wait=90",
            "flower.supernode_auth=true",
        ],
    )
    out = runner.run(cfg, tmp_path / "run", verbose=False)
    assert time.monotonic() - t0 < TIME_LIMIT

    from prelort.check import check_run_dir

    assert check_run_dir(out) == []
    trains = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [(t["round"], t["accepted"], t["failed"]) for t in trains] == [(1, 2, 0), (2, 2, 0)]
    assert (out / "checkpoints" / "round-2" / "adapter.safetensors").is_file()

    # the SuperNode whose key was never registered is refused and gives up
    intruder.wait(timeout=max(1.0, TIME_LIMIT - (time.monotonic() - t0)))
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in intruder_log.read_text(errors="replace")
    assert "holds client" in (out / "run.log").read_text()
