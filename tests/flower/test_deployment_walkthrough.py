"""docs/deployment.md's walk-through "three sites, your own files", run as written on one machine: the server's
and the sites' commands in their own directories, host names and ports replaced by loopback ones, /srv/prelort
and /srv/site by temporary directories, and the run shortened to the tiny model (``--set``). The SuperLink and
SuperNodes (the commands left running) are started in the background and stopped at the end."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("cryptography")

from tests.site_files import canary, run_dir_text, write_records  # noqa: E402

from prelort.apps.launch import free_port, wait_healthy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "deployment.md"
TIME_LIMIT = 600.0
# what one machine cannot reproduce: the tiny model and one short round instead of SmolLM2's three
SHORT_RUN = (
    "model.name=tiny-llama rounds=1 data.num_train=32 data.num_test=8 data.max_length=64 train.local_steps=1 "
    "train.batch_size=4 eval.max_examples=4 eval.max_new_tokens=2 eval.truncation_curve=false eval.base=false "
    "flower.round_timeout=240 flower.node_wait=120"
)
LEFT_RUNNING = ("flower-superlink", "flower-supernode")
SITES = {"A": ("alpha", 6, 4), "B": ("bravo", 9, 3), "C": ("charlie", 5, 0)}  # name, records, held-out records


def walkthrough_blocks() -> list[tuple[str, str, str]]:
    """``(language, machine, text)`` of every fenced block of the walk-through, in order; the machine is the
    block's first comment ("server", "site A", ...; a file's name follows a colon)."""
    text = DOC.read_text()
    section = text[text.index("### Walk-through: three sites, your own files") : text.index("## Large updates")]
    blocks = []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        first = body.splitlines()[0] if body.strip() else ""
        machine = first.lstrip("# ").strip() if first.startswith("#") else "server"
        blocks.append((lang, machine, body))
    return blocks


def test_the_walkthrough_has_the_server_and_three_sites():
    machines = {m.split(":")[0] for _, m, _ in walkthrough_blocks()}
    assert machines == {"server", "site A", "site B", "site C"}


@pytest.mark.slow  # a TLS SuperLink, three SuperNodes and a round: minutes on 2 CPU cores
def test_the_three_site_walkthrough_runs_as_written(tmp_path, processes):
    pytest.importorskip("bitsandbytes")  # site C declares quantization="nf4"
    t0 = time.monotonic()
    port = free_port()
    server = tmp_path / "srv-prelort"
    server.mkdir()
    sites = {}
    for letter, (name, n, n_eval) in SITES.items():
        d = tmp_path / f"site-{letter}"
        d.mkdir()
        write_records(d / "train.jsonl", n, name, "Repeat the code")
        if n_eval:
            write_records(d / "held-out.jsonl", n_eval, name, "Say the code")
        sites[letter] = d
    bin_dir = tmp_path / "bin"  # `prelort` and `python` as an activated environment has them
    bin_dir.mkdir()
    for tool, target in (("prelort", f'"{sys.executable}" -m prelort'), ("python", f'"{sys.executable}"')):
        (bin_dir / tool).write_text(f'#!/usr/bin/env bash\nexec {target} "$@"\n')
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{processes.env['PATH']}", "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}

    def local(text: str, machine: str) -> tuple[str, Path]:
        here = server if machine.startswith("server") else sites[machine.split()[-1]]
        text = text.replace("/srv/prelort", str(server)).replace("/srv/site", str(here))
        text = text.replace("--host 0.0.0.0 --port 9093", f"--host 127.0.0.1 --port {port}")
        text = text.replace("superlink.example.org:9093", f"127.0.0.1:{port}")
        text = re.sub(r"--port 9094\b", lambda _: f"--port {free_port()}", text)
        shortened = "prelort run sites.yaml --out runs/sites --set " + SHORT_RUN.replace(" ", " --set ")
        return text.replace("prelort run sites.yaml --out runs/sites", shortened), here

    for lang, machine, body in walkthrough_blocks():
        text, here = local(body, machine)
        if lang == "toml":
            home = Path(processes.env["FLWR_HOME"])
            home.mkdir(parents=True, exist_ok=True)
            (home / "config.toml").write_text(text)
        elif lang == "yaml":
            (here / machine.split(":")[1].strip()).write_text(text)
        elif any(line.startswith(LEFT_RUNNING) for line in text.splitlines()):
            for line in (x for x in text.splitlines() if x.startswith(LEFT_RUNNING)):
                proc, log = processes.start(f"{machine.replace(' ', '-')}", shlex.split(line), env=env, cwd=here)
                if line.startswith("flower-superlink"):
                    ca = ssl.create_default_context(cafile=str(server / "certs" / "ca.crt"))
                    wait_healthy(f"https://127.0.0.1:{port}/health", proc, 60, log, context=ca)
        else:
            res = subprocess.run(
                ["bash", "-ec", text],
                cwd=here,
                env={**processes.env, **env},
                capture_output=True,
                text=True,
                timeout=TIME_LIMIT,
            )
            assert res.returncode == 0, f"{machine} block failed:\n{text}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
            if "prelort certs" in text:  # the operator sends each site the CA and its key
                for k, d in enumerate(sites.values(), 1):
                    (d / "certs").mkdir()
                    for f in ("ca.crt", f"supernode_{k}"):
                        shutil.copy(server / "certs" / f, d / "certs" / f)
    assert time.monotonic() - t0 < TIME_LIMIT

    run = server / "runs" / "sites"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in metrics if r["kind"] == "train")
    # site C holds its base in nf4 (its node-config quantization), the others as model.quantization says
    assert [(c["rank"], c["quantization"], c["num_examples"], c["status"]) for c in train["clients"]] == [
        (2, "none", 6, "accepted"),
        (8, "none", 9, "accepted"),
        (4, "nf4", 5, "accepted"),
    ]
    on_site = [(r["rank"], r["n"], r["sites"]) for r in metrics if r["kind"] == "federated_eval"]
    assert on_site == [(2, 4, 1), (8, 3, 1)]
    text = run_dir_text(run)
    assert all(canary(name) not in text and str(sites[k]) not in text for k, (name, *_) in SITES.items())
