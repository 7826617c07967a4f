"""Smoke tests of the server-side benchmarks (bench/aggregation.py, bench/communication.py).

Each script's ``main`` runs at its smallest settings; the JSON it writes must have the fields the
report relies on, with values that follow from the shapes (bytes are exact, times positive).
"""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load_bench

METHODS = ("prelort", "fedit", "zeropad", "hetlora", "flexlora", "flora")


@pytest.fixture(scope="module")
def common():
    return load_bench("_common")


def test_model_shapes_match_the_real_models(common):
    smol = common.MODELS["smollm2"].module_shapes()
    assert len(smol) == 30 * 4
    assert smol["model.layers.0.self_attn.q_proj"] == (576, 576)
    assert smol["model.layers.29.self_attn.k_proj"] == (192, 576)
    assert smol["model.layers.7.self_attn.o_proj"] == (576, 576)
    big = common.MODELS["1b"].module_shapes()
    assert len(big) == 16 * 4
    assert big["model.layers.15.self_attn.v_proj"] == (512, 2048)
    assert big["model.layers.0.self_attn.q_proj"] == (2048, 2048)
    # One rank dimension of SmolLM2: 30 layers x (2 x (576 + 576) + 2 x (192 + 576)) floats.
    assert common.MODELS["smollm2"].lora_floats_per_rank() == 30 * (2 * 1152 + 2 * 768)


def test_aggregation_quick_inline_writes_consistent_json(tmp_path, common):
    agg = load_bench("aggregation")
    out = tmp_path / "agg.json"
    agg.main(
        ["--quick", "--isolation", "inline", "--clients", "8,16,32", "--max-clients-slow", "16", "--json", str(out)]
    )
    data = json.loads(out.read_text())
    assert data["benchmark"] == "aggregation"
    assert data["settings"]["isolation"] == "inline" and "INLINE RUN" in data["notes"]["memory"]
    model = data["models"]["tiny"]
    cases = {(c["method"], c["n_clients"]): c for c in model["cases"]}
    assert set(cases) == {(m, n) for m in METHODS for n in (8, 16, 32)}
    per_rank = common.MODELS["tiny"].lora_floats_per_rank() * 4
    for (method, n), c in cases.items():
        assert "error" not in c, c
        slow = method in ("flexlora", "flora")
        assert c["n_measured"] == (min(n, 16) if slow else n)
        assert c["subset"] is (c["n_measured"] < n)
        ranks = common.draw_ranks(n, 0)[: c["n_measured"]]
        trained = [2] * len(ranks) if method == "fedit" else ranks  # FedIT: everyone at r_min = 2
        assert c["bytes_read"] == sum(trained) * per_rank
        assert c["ranks_histogram"] == {str(r): trained.count(r) for r in sorted(set(trained))}
        for field in ("aggregate_s", "aggregate_cpu_s", "broadcast_cpu_s", "server_round_cpu_s"):
            assert 0 < c[field] < 60, (field, c[field])
        assert c["peak_rss_rise_bytes"] >= 0
        assert c["torch_threads"] == 1
    # A capped case at N=32 is the N=16 measurement (same first 16 clients), labelled as reused.
    assert cases[("flexlora", 32)]["reused_from_n_clients"] == 16
    assert cases[("flexlora", 32)]["aggregate_cpu_s"] == cases[("flexlora", 16)]["aggregate_cpu_s"]
    assert "reused_from_n_clients" not in cases[("prelort", 32)]
    # The memcpy reference copies exactly the bytes PreLort reads.
    for n in (8, 16, 32):
        assert cases[("prelort", n)]["memcpy_bytes"] == cases[("prelort", n)]["bytes_read"]
        assert cases[("prelort", n)]["memcpy_cpu_GBps"] > 0
        # The round's fixed cost (aggregate with no update) is measured for every case.
        assert 0 < cases[("prelort", n)]["fixed_round_cpu_s"] < 60
    summary = model["summary"]
    speed = {s["n_clients"]: s for s in summary["speedup_vs_flexlora"]}
    assert speed[32]["flexlora_extrapolated"] and not speed[16]["flexlora_extrapolated"]
    assert speed[8]["aggregate_speedup"] == pytest.approx(
        cases[("flexlora", 8)]["aggregate_cpu_per_client_s"] / cases[("prelort", 8)]["aggregate_cpu_per_client_s"]
    )
    assert [b["n_clients"] for b in summary["bandwidth_vs_memcpy"]] == [8, 16, 32]
    assert set(summary["goals"]) == {"speedup_ge_100x", "bandwidth_ge_30pct_memcpy", "prelort_memory_flat"}
    for goal in summary["goals"].values():
        assert isinstance(goal["met"], bool)
    # --report recomputes the same summary from the saved cases, without measuring.
    again = agg.main(["--report", str(out)])
    assert again["models"]["tiny"]["summary"] == json.loads(json.dumps(summary))


def test_aggregation_measures_without_printing_and_reports_in_the_registry_order(capsys, common):
    agg = load_bench("aggregation")
    assert common.method_order() == list(METHODS)  # the registry's listing order, the README's
    settings = agg.Settings(
        models=("tiny",),
        clients=(8,),
        methods=("flexlora", "prelort"),
        slow_methods=frozenset(),
        max_clients_slow=0,
        bcast_layers=1,
        seed=0,
        repeats=1,
        threads=1,
        isolation="inline",
        case_timeout=60.0,
        quick=True,
        argv=(),
    )
    seen = []
    results = agg.run_benchmark(settings, on_case=lambda model, result: seen.append((model, result["method"])))
    assert capsys.readouterr().out == ""  # measuring prints nothing; main prints
    assert seen == [("tiny", "flexlora"), ("tiny", "prelort")]
    assert results["settings"]["methods"] == ["flexlora", "prelort"]
    record = results["models"]["tiny"]
    assert list(record["summary"]["peak_memory"]) == ["prelort", "flexlora"]
    text = agg.format_model_report("tiny", record["cases"], record["summary"], 0, 1)
    assert text.index("\nprelort ") < text.index("\nflexlora ")  # the table in the registry's order
    assert "Goals:" in text and "speedup_ge_100x" in text


def test_aggregation_process_isolation_sees_flora_retain_updates(tmp_path):
    """Fresh process per case: PreLort's peak stays flat in N, FLoRA's grows with the bytes it keeps."""
    agg = load_bench("aggregation")
    # N = 8 vs 256: the extra bytes streamed (~74 MiB) dwarf what a streaming aggregator may hold whatever N is
    # (its sums, allocated up to the largest rank seen, and a buffer of at most 8 updates).
    data = agg.main(["--quick", "--methods", "prelort,flora", "--clients", "8,256", "--json", str(tmp_path / "a.json")])
    summary = data["models"]["tiny"]["summary"]
    cases = {(c["method"], c["n_clients"]): c for c in data["models"]["tiny"]["cases"]}
    assert all("error" not in c for c in cases.values()), cases
    assert cases[("prelort", 8)]["memory_method"] in ("VmHWM", "sampled-1ms")
    assert summary["goals"]["prelort_memory_flat"]["met"], summary["goals"]["prelort_memory_flat"]
    assert summary["peak_memory"]["prelort"]["retained_fraction_of_extra_bytes"] < 0.2
    # FLoRA stacks every update: its peak grows by at least half the extra bytes streamed.
    assert summary["peak_memory"]["flora"]["retained_fraction_of_extra_bytes"] > 0.5


def test_aggregation_rejects_bad_flags():
    agg = load_bench("aggregation")
    with pytest.raises(SystemExit, match="unknown model"):
        agg.main(["--models", "gpt5", "--isolation", "inline"])
    with pytest.raises(SystemExit, match="unknown method"):
        agg.main(["--quick", "--methods", "fedprox", "--isolation", "inline"])
    with pytest.raises(SystemExit, match="integers >= 1"):
        agg.main(["--quick", "--clients", "0,10", "--isolation", "inline"])


def test_communication_quick_writes_exact_sizes(tmp_path, common):
    comm = load_bench("communication")
    out = tmp_path / "comm.json"
    comm.main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "communication"
    model = data["models"]["tiny"]
    shape = common.MODELS["tiny"]
    per_rank = shape.lora_floats_per_rank() * 4
    dense = shape.dense_floats() * 4
    assert model["lora_bytes_per_rank"] == per_rank and model["dense_delta_bytes"] == dense
    by_method = {m["method"]: {row["rank"]: row for row in m["ranks"]} for m in model["methods"]}
    assert set(by_method) == set(METHODS)
    for method, rows in by_method.items():
        assert sorted(rows) == [2, 4, 8, 16, 32, 64]
        for r, row in rows.items():
            trained = 2 if method == "fedit" else r
            assert row["trained_rank"] == trained
            assert row["upload_raw_bytes"] == trained * per_rank
            # safetensors adds only a header (names, shapes, offsets).
            assert 0 < row["upload_safetensors_bytes"] - row["upload_raw_bytes"] < 4096
            assert 0 < row["upload_meta_json_bytes"] < 512
            extra = dense if method == "flora" else 0  # FLoRA also sends the merged dense delta
            assert row["download_raw_bytes"] == trained * per_rank + extra
            assert row["download_base_delta_raw_bytes"] == extra
            assert row["download_safetensors_bytes"] > row["download_raw_bytes"]
    stacked = {s["n_clients"]: s for s in model["flora_stacked"]}
    assert sorted(stacked) == [4, 16]
    for n, s in stacked.items():
        ranks = common.draw_ranks(n, 0)
        assert s["stacked_rank"] == s["sum_of_ranks"] == sum(ranks)
        assert s["stacked_raw_bytes"] == sum(ranks) * per_rank
        assert s["dense_delta_raw_bytes"] == dense
    assert stacked[16]["stacked_raw_bytes"] > stacked[4]["stacked_raw_bytes"]  # grows with N
    totals = {(t["method"], t["n_clients"]): t for t in model["round_totals"]}
    ranks16 = common.draw_ranks(16, 0)
    assert totals[("prelort", 16)]["server_ingress_bytes"] == sum(
        by_method["prelort"][r]["upload_safetensors_bytes"] for r in ranks16
    )
    assert model["ratios_at_rank"]["fedit"]["64"]["up"] < 0.1


def test_communication_sizes_do_not_change_after_a_round(common):
    """The benchmark measures round-0 broadcasts; every method sends the same shapes after a round."""
    from prelort.methods import ClientUpdate, FederationSpec, build, key

    modules = common.MODELS["tiny"].module_shapes(1)
    spec = FederationSpec(modules=modules, client_ranks=common.RANK_CHOICES, alpha=common.ALPHA)
    g = torch.Generator().manual_seed(3)
    for name in METHODS:
        method = build(name, spec)
        state = method.init_state(torch.Generator().manual_seed(0))
        updates = []
        for client, r in enumerate(common.RANK_CHOICES):
            rank = method.plan(r).rank
            tensors = {}
            for module, (d_out, d_in) in modules.items():
                tensors[key(module, "lora_A")] = torch.randn(rank, d_in, generator=g)
                tensors[key(module, "lora_B")] = torch.randn(d_out, rank, generator=g)
            updates.append(ClientUpdate(client=client, rank=rank, num_examples=10 + client, tensors=tensors))
        after = method.aggregate(state, updates)
        for r in common.RANK_CHOICES:
            before_b, after_b = method.broadcast(state, r), method.broadcast(after, r)
            shapes = lambda b: {k: tuple(v.shape) for k, v in {**b.adapter, **(b.base_delta or {})}.items()}  # noqa: E731
            assert shapes(before_b) == shapes(after_b), (name, r)
