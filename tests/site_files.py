"""Site files for the tests of site-local data (clients.sites, node-config data-path): JSONL records each
carrying a canary string that must never reach the server's run directory, and the tiny federation they train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"

# (name, training records, held-out records, rank) of the three sites; the third one's file is broken
SITES = (("alpha", 6, 4, 2), ("bravo", 9, 3, 8))
BROKEN_RANK = 4


def canary(name: str) -> str:
    return f"CANARY-{name.upper()}-5d1f"


def write_records(path: Path, n: int, name: str, what: str) -> Path:
    """``n`` alpaca records, every one carrying the site's canary in its input and output."""
    with open(path, "w") as fh:
        for i in range(n):
            secret = canary(name)
            fh.write(json.dumps({"instruction": f"{what} {i}", "input": secret, "output": f"{i} {secret}"}) + "\n")
    return path


def write_sites(root: Path) -> dict[str, Any]:
    """Every site's files under ``root/<name>/``: ``{name: {"data", "eval", "rank", "n"}}`` plus ``"broken"`` (a
    file that is not JSON, with a canary too)."""
    out: dict[str, Any] = {}
    for name, n_train, n_eval, rank in SITES:
        d = root / name
        d.mkdir(parents=True)
        out[name] = {
            "data": write_records(d / "train.jsonl", n_train, name, "Repeat the code"),
            "eval": write_records(d / "held-out.jsonl", n_eval, name, "Say the code"),
            "rank": rank,
            "n": n_train,
            "n_eval": n_eval,
        }
    broken = root / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text('{"instruction": "' + canary("broken") + '", oops\n')
    out["broken"] = {"data": broken / "train.jsonl", "rank": BROKEN_RANK}
    return out


def federation(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny federation of the tests (2 rounds, 1 local step, on-site evaluation after round 2), as a config
    dict without clients (each test declares them)."""
    data = yaml.safe_load(TINY.read_text())
    data.pop("clients")
    data["rounds"] = 2
    data["train"].update(local_steps=1, batch_size=4)
    data["data"].update(num_train=32, num_test=8)
    data["eval"].update(every=2, max_examples=4, max_new_tokens=2, truncation_curve=False, base=False)
    data.update(overrides or {})
    return data


def site_declarations(files: dict[str, Any], eval_sites: bool = True) -> list[dict[str, Any]]:
    """``clients.sites`` of the sites in ``files`` (client k = the k-th site, the broken one last)."""
    sites = [
        {"data_path": str(files[name]["data"]), "rank": files[name]["rank"]}
        | ({"eval_path": str(files[name]["eval"])} if eval_sites else {})
        for name, *_ in SITES
    ]
    return sites + [{"data_path": str(files["broken"]["data"]), "rank": files["broken"]["rank"]}]


def run_dir_text(run: Path) -> str:
    """Every byte of the run directory's text files (JSON, YAML, CSV, log), for canary searches."""
    return "\n".join(
        p.read_text(errors="replace") for p in sorted(run.rglob("*")) if p.is_file() and p.suffix != ".png"
    )
