"""A per-site quantised base (clients.sites[].quantization, issue 28) in one process: one site trains on an nf4
base while the other trains on float32. The run completes, every update keeps the float32 shapes, the training
records say how each client held its base, the nf4 site's update is not the one it would send on float32 (the
setting applied) and the float32 site's is exactly the one of the same federation where no site sets one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.site_files import SITES, federation, site_declarations, write_sites

from prelort import runner
from prelort.adapters import LoraAdapter
from prelort.config import ConfigError, from_dict
from prelort.models import quantized_modules
from prelort.recipe import ClientModels, load_federation_model

pytest.importorskip("bitsandbytes")

NF4_SITE, FLOAT_SITE = 0, 1  # alpha (rank 2) holds an nf4 base; bravo (rank 8) follows model.quantization


def _config(files, quantizations: dict[int, str]):
    sites = site_declarations(files)[: len(SITES)]  # the two sites with usable files
    for k, quantization in quantizations.items():
        sites[k]["quantization"] = quantization
    return from_dict(federation({"audit": True, "clients": {"sites": sites}}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{"mixed": run with the nf4 site, "float": the same federation with no site setting}``."""
    root = tmp_path_factory.mktemp("site-quantization")
    files = write_sites(root / "files")
    return {
        name: runner.run(_config(files, quantizations), root / name, verbose=False)
        for name, quantizations in (("mixed", {NF4_SITE: "nf4"}), ("float", {}))
    }


def _update(run, round_: int, client: int) -> dict[str, torch.Tensor]:
    (path,) = (run / "updates" / f"round-{round_}").glob(f"client-{client}*.safetensors")
    return load_file(path)


def _train_records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def test_a_federation_with_an_nf4_site_and_a_float32_site_completes_with_float32_updates(runs, check_run):
    mixed, plain = runs["mixed"], runs["float"]
    check_run(mixed)
    trains = _train_records(mixed)
    assert [t["round"] for t in trains] == [1, 2] and all(t["accepted"] == 2 for t in trains)
    for round_ in (1, 2):
        for client in (NF4_SITE, FLOAT_SITE):
            got, want = _update(mixed, round_, client), _update(plain, round_, client)
            assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
            assert all(v.dtype == torch.float32 for v in got.values())


def test_the_training_records_say_how_each_client_held_its_base(runs):
    for name, want in (
        ("mixed", {NF4_SITE: "nf4", FLOAT_SITE: "none"}),
        ("float", {NF4_SITE: "none", FLOAT_SITE: "none"}),
    ):
        for t in _train_records(runs[name]):
            assert {c["client"]: c["quantization"] for c in t["clients"]} == want


def test_the_nf4_site_sends_another_update_and_the_float32_site_the_same_one(runs):
    # round 1: both runs broadcast the same initial state, so only the base a site trains on can differ
    mixed, plain = runs["mixed"], runs["float"]
    nf4, as_float = _update(mixed, 1, NF4_SITE), _update(plain, 1, NF4_SITE)
    assert max((nf4[k] - as_float[k]).abs().max().item() for k in nf4) > 1e-6
    same, reference = _update(mixed, 1, FLOAT_SITE), _update(plain, 1, FLOAT_SITE)
    for k in reference:
        torch.testing.assert_close(same[k], reference[k], rtol=1e-5, atol=1e-6)


def test_the_on_site_evaluation_of_the_nf4_site_runs_on_its_own_base(runs):
    fed = [json.loads(x) for x in (runs["mixed"] / "metrics.jsonl").read_text().splitlines() if "federated_eval" in x]
    assert sorted(r["rank"] for r in fed) == sorted(rank for *_, rank in SITES)
    log = (runs["mixed"] / "run.log").read_text()
    assert "raised during on-site evaluation" not in log and "raised during training" not in log


def test_client_models_load_one_model_per_setting_with_the_same_float32_lora_factors(tmp_path):
    cfg = from_dict(federation({"clients": {"num": 2, "per_round": 2, "ranks": [2, 4]}}))
    _, tokenizer, model = load_federation_model(cfg)
    models = ClientModels(cfg, {"none": (model, tokenizer)})
    nf4, _ = models.at("nf4")
    assert models.at("none")[0] is model and models.at("nf4")[0] is nf4 and models.settings() == ["none", "nf4"]
    assert set(quantized_modules(nf4).values()) == {"nf4"} and not quantized_modules(model)
    ours, theirs = LoraAdapter(model), LoraAdapter(nf4)
    assert ours.modules == theirs.modules
    for name, tensor in ours.read_state(4).items():
        assert torch.equal(tensor, theirs.read_state(4)[name]), name


def test_a_site_quantization_outside_the_choices_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"clients\.sites\.0\.quantization"):
        from_dict({"clients": {"sites": [{"data_path": "a.jsonl", "rank": 2, "quantization": "fp4"}]}})


def test_a_site_without_a_setting_follows_model_quantization():
    cfg = from_dict(
        {
            "model": {"quantization": "int8"},
            "clients": {
                "sites": [{"data_path": "a", "rank": 2, "quantization": "none"}, {"data_path": "b", "rank": 4}]
            },
        }
    )
    assert [cfg.client_quantization(k) for k in (0, 1)] == ["none", "int8"]
    assert cfg.client_quantization(1, declared="nf4") == "nf4"  # a SuperNode's declaration comes first
    assert from_dict(cfg.to_dict()).clients == cfg.clients  # config.yaml of the run loads back


class _ReportingEngine:
    """The in-process engine plus ``quantization_of``, as a Flower engine reports what the SuperNodes declared."""

    def __init__(self, session):
        from prelort.engines.inprocess import InProcessEngine

        self.inner = InProcessEngine(session, progress=False)

    def execute(self, tasks):
        return self.inner.execute(tasks)

    def quantization_of(self, client: int) -> str | None:
        return {0: "int8"}.get(client)


def test_an_engine_that_knows_each_clients_quantization_is_what_the_records_say(tmp_path):
    cfg = from_dict(federation({"rounds": 1, "clients": {"num": 2, "per_round": 2, "ranks": [2, 4]}}))
    session = runner.Session(cfg, tmp_path / "run", verbose=False)
    run = session.run(_ReportingEngine(session))
    (train,) = _train_records(run)
    assert [(c["client"], c["quantization"], c["status"]) for c in train["clients"]] == [
        (0, "int8", "accepted"),
        (1, None, "accepted"),
    ]
