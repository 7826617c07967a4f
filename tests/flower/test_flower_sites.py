"""engine: flower with site-local data: a loopback SuperLink and three SuperNodes whose node-configs name their
own JSONL files and ranks (2, 8, and a broken file at 4). Each update counts its own file's records, nothing
of the files reaches the run directory, the ranks recorded are the declared ones, on-site evaluation is summed
per tier, the broken site is a failed client with its reason in run.log, and the global adapter equals the one
of the same federation declared in-process (clients.sites) at equal thread counts.

Hard time bound: the ``processes`` fixture's watchdog stops every process after TIME_LIMIT seconds.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402
from tests.site_files import SITES, canary, federation, run_dir_text, site_declarations, write_sites  # noqa: E402

from prelort import runner  # noqa: E402
from prelort.apps.launch import flwr_executable, free_port, wait_healthy  # noqa: E402
from prelort.check import check_run_dir  # noqa: E402
from prelort.config import from_dict  # noqa: E402
from prelort.report import final_round_table, read_run  # noqa: E402

TIME_LIMIT = 600.0
pytestmark = pytest.mark.slow  # ~3 minutes on 2 CPU cores: a ClientApp process starts for every message


def node_config(k: int, num: int, site: dict) -> str:
    """What a site types after --node-config: TOML values, so paths are quoted."""
    text = f'partition-id={k} num-partitions={num} rank={site["rank"]} data-path="{site["data"]}"'
    return text + (f' eval-path="{site["eval"]}"' if "eval" in site else "")


def _records(run, kind):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in x]


def test_sites_train_on_their_own_files_at_their_declared_ranks(tmp_path, processes):
    t0 = time.monotonic()
    files = write_sites(tmp_path / "files")
    order = [name for name, *_ in SITES] + ["broken"]
    port = free_port()
    link, link_log = processes.start(
        "superlink",
        [
            flwr_executable("flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
    )
    wait_healthy(f"http://127.0.0.1:{port}/health", link, 60, link_log)
    for k, name in enumerate(order):
        processes.start(
            f"supernode-{name}",
            [
                flwr_executable("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
                "--node-config",
                node_config(k, len(order), files[name]),
            ],
            env={"OMP_NUM_THREADS": "1"},  # the in-process twin below trains on one thread too
        )
    cfg = from_dict(
        federation(
            {
                "engine": "flower",
                "clients": {"num": len(order), "per_round": len(order)},
                "flower": {
                    "superlink": f"127.0.0.1:{port}",
                    "insecure": True,
                    "allow_insecure": True,
                    "round_timeout": 240,
                    "node_wait": 120,
                },
            }
        )
    )
    out = runner.run(cfg, tmp_path / "run", verbose=False)
    assert time.monotonic() - t0 < TIME_LIMIT
    assert check_run_dir(out) == []

    ranks = [files[name]["rank"] for name in order]
    assert from_dict(json.loads(json.dumps(_config(out)))).clients.ranks == ranks  # the declared ranks
    for t in _records(out, "train"):
        by_client = {c["client"]: c for c in t["clients"]}
        assert [by_client[k]["rank"] for k in range(len(order))] == ranks
        for k, name in enumerate(order[:-1]):
            assert (by_client[k]["status"], by_client[k]["num_examples"]) == ("accepted", files[name]["n"])
        broken = by_client[len(order) - 1]
        assert broken["status"] == "failed" and "site data-path: cannot be read as json" in broken["reason"]
    assert "site data-path: cannot be read as json" in (out / "run.log").read_text()

    fed = _records(out, "federated_eval")
    assert [(r["round"], r["rank"], r["n"], r["sites"]) for r in fed] == [
        (2, files[name]["rank"], files[name]["n_eval"], 1) for name in order[:-1]
    ]
    assert "on-site evaluation" in final_round_table(read_run(out))

    text = run_dir_text(out)
    for name in order:
        assert canary(name) not in text
        assert str(files[name]["data"]) not in text and f"files/{name}" not in text

    # the same federation in one process: the same global adapter
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        twin = runner.run(
            from_dict(federation({"clients": {"sites": site_declarations(files)}})), tmp_path / "twin", verbose=False
        )
    finally:
        torch.set_num_threads(threads)
    flower_adapter = load_file(out / "checkpoints" / "round-2" / "adapter.safetensors")
    twin_adapter = load_file(twin / "checkpoints" / "round-2" / "adapter.safetensors")
    assert flower_adapter.keys() == twin_adapter.keys()
    for key, value in flower_adapter.items():
        torch.testing.assert_close(value, twin_adapter[key], rtol=0, atol=1e-6)


def _config(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def test_flower_sim_takes_the_same_site_declarations_as_in_process(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")  # the first site holds its base in nf4
    files = write_sites(tmp_path / "files")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the simulation's client actors inherit it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sites = site_declarations(files)
        sites[0]["quantization"] = "nf4"  # a simulation process may serve sites that hold their bases differently
        declared = {"clients": {"sites": sites}}
        ref = runner.run(from_dict(federation(declared)), tmp_path / "inprocess", verbose=False)
        sim = runner.run(from_dict(federation({**declared, "engine": "flower-sim"})), tmp_path / "sim", verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert check_run_dir(sim) == []
    a = load_file(ref / "checkpoints" / "round-2" / "adapter.safetensors")
    b = load_file(sim / "checkpoints" / "round-2" / "adapter.safetensors")
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=1e-6)

    def clients(run):
        return [
            [(c["client"], c["rank"], c["quantization"], c["num_examples"], c["status"]) for c in t["clients"]]
            for t in _records(run, "train")
        ]

    assert clients(sim) == clients(ref)
    assert [c[2] for c in clients(sim)[0]] == ["nf4", "none", "none"]
    on_site = [(r["rank"], r["n"], r["correct"], r["sites"]) for r in _records(sim, "federated_eval")]
    assert on_site == [(r["rank"], r["n"], r["correct"], r["sites"]) for r in _records(ref, "federated_eval")]
    assert len(on_site) == len(SITES)
