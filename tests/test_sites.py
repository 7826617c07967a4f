"""Site-local data in one process (clients.sites): each client trains on its own file at its own rank,
evaluates on its own held-out file, and nothing of its records reaches the run directory; a site whose file
is broken is a failed client with a readable reason, and the run finishes."""

from __future__ import annotations

import json

import pytest
from tests.site_files import SITES, canary, federation, run_dir_text, site_declarations, write_sites

from prelort import runner
from prelort.check import check_run_dir
from prelort.config import ConfigError, from_dict
from prelort.report import final_round_table, read_run


def _records(run, kind):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in x]


@pytest.fixture(scope="module")
def site_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    files = write_sites(root / "files")
    cfg = from_dict(federation({"clients": {"sites": site_declarations(files)}}))
    return files, runner.run(cfg, root / "run", verbose=False)


def test_each_site_trains_on_its_own_file_at_its_own_rank(site_run):
    files, run = site_run
    assert check_run_dir(run) == []
    trains = _records(run, "train")
    assert [t["round"] for t in trains] == [1, 2]
    for t in trains:
        by_client = {c["client"]: c for c in t["clients"]}
        for k, (name, *_rest) in enumerate(SITES):
            assert by_client[k]["status"] == "accepted"
            assert by_client[k]["rank"] == files[name]["rank"]
            assert by_client[k]["num_examples"] == files[name]["n"]  # its own file's records, nothing else
        broken = by_client[len(SITES)]
        assert broken["status"] == "failed" and broken["rank"] == files["broken"]["rank"]
        assert "site data-path: cannot be read as json" in broken["reason"]
        assert t["accepted"] == len(SITES) and t["failed"] == 1


def test_a_broken_site_file_is_a_readable_failure_in_run_log(site_run):
    _, run = site_run
    log = (run / "run.log").read_text()
    assert "client 2 failed" in log and "site data-path: cannot be read as json" in log


def test_no_record_text_of_any_site_reaches_the_run_directory(site_run):
    _, run = site_run
    text = run_dir_text(run)
    for name in [s[0] for s in SITES] + ["broken"]:
        assert canary(name) not in text


def test_on_site_evaluation_is_summed_per_tier_and_reported(site_run):
    files, run = site_run
    fed = _records(run, "federated_eval")
    assert [(r["round"], r["rank"], r["n"], r["sites"]) for r in fed] == [
        (2, files[name]["rank"], files[name]["n_eval"], 1) for name, *_ in SITES
    ]
    for r in fed:
        assert 0 <= r["correct"] <= r["n"] and r["loglik_sum"] < 0 and r["tokens"] > 0
    table = final_round_table(read_run(run))
    assert "on-site evaluation" in table
    assert all(f"| {files[name]['rank']} |" in table for name, *_ in SITES)


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ({"num": 3, "sites": [{"data_path": "a.jsonl", "rank": 2}]}, "num (3) differs from the 1 clients.sites"),
        ({"ranks": [4], "sites": [{"data_path": "a.jsonl", "rank": 2}]}, "differ from the ranks of clients.sites"),
        ({"sites": [{"data_path": "a.jsonl", "rank": 0}]}, "sites[0]: rank 0 is not positive"),
        ({"sites": [{"data_path": "a.jsonl", "rank": -2}]}, "sites[0]: rank -2 is not positive"),
        ({"max_rank": 4, "sites": [{"data_path": "a.jsonl", "rank": 8}]}, "rank 8 is above clients.max_rank (4)"),
        ({"sites": [{"data_path": "a.jsonl", "rank": 2.5}]}, "clients.sites.0.rank"),
        ({"sites": []}, "sites is empty"),
        ({"sites": [{"rank": 2}]}, "clients.sites.0.data_path"),
    ],
)
def test_conflicting_or_invalid_site_declarations_are_refused(clients, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        from_dict({"clients": clients})


def test_sites_set_num_ranks_and_per_round_and_survive_the_resolved_config():
    cfg = from_dict({"clients": {"sites": [{"data_path": "a", "rank": 2}, {"data_path": "b", "rank": 8}]}})
    assert (cfg.clients.num, cfg.clients.ranks, cfg.clients.per_round) == (2, [2, 8], 2)
    assert from_dict(cfg.to_dict()).clients == cfg.clients  # config.yaml of the run loads back


def test_check_refuses_on_site_records_whose_sums_do_not_add_up(site_run, tmp_path):
    import shutil

    _, run = site_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    good = _records(copy, "federated_eval")[0]
    bad = [
        dict(good, round=7, correct=good["n"] + 1),
        dict(good, round=8, loglik_sum=1.5),
        dict(good, round=9, sites=0),
    ]
    with open(copy / "metrics.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in bad)
    problems = "\n".join(check_run_dir(copy))
    assert "exceeds n" in problems and "loglik_sum 1.5" in problems and "sites 0" in problems
