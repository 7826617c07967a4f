"""A 1B-class adapter (Llama-3.2-1B attention shapes, rank 64: ~54.5 MB float32) through prelort's Flower
records: the encoding at full size without a Flower run (fast), and the real Flower round trip of
bench/flower_payload.py at small shapes (slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("flwr")

from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE  # noqa: E402

from prelort.flower import records  # noqa: E402
from prelort.methods import Broadcast, ClientUpdate, TrainPlan  # noqa: E402

# meta-llama/Llama-3.2-1B: hidden 2048, 16 layers, q/o 2048x2048, k/v 512x2048 (8 kv heads x 64)
LLAMA_1B = {
    f"model.layers.{i}.self_attn.{p}": shape
    for i in range(16)
    for p, shape in (
        ("q_proj", (2048, 2048)),
        ("k_proj", (512, 2048)),
        ("v_proj", (512, 2048)),
        ("o_proj", (2048, 2048)),
    )
}
RANK = 64
EXPECTED_BYTES = 4 * RANK * sum(d_out + d_in for d_out, d_in in LLAMA_1B.values())  # 54,525,952


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_out, d_in) in LLAMA_1B.items():
        out[f"{m}.lora_A"] = torch.randn(RANK, d_in, generator=g)
        out[f"{m}.lora_B"] = torch.randn(d_out, RANK, generator=g)
    return out


def test_1b_rank64_update_round_trips_through_the_records_in_5mib_chunks():
    assert EXPECTED_BYTES == 54_525_952
    tensors = _adapter(0)
    update = ClientUpdate(3, RANK, 100, tensors, 2, "prelort", {"loss": 1.5})
    content = records.encode_reply(update)
    payload = content[records.UPDATE]["safetensors"]
    # the safetensors payload = the raw floats + a header of ~100 bytes per tensor
    assert EXPECTED_BYTES < len(payload.data) < EXPECTED_BYTES + 200 * len(tensors)
    # Flower sends an Array as chunks of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB), far below gRPC's
    # message limit, whatever the update's size; the chunks reassemble to the payload
    chunks = [c for _, c in payload.slice_array()]
    assert len(chunks) == math.ceil(len(payload.data) / FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) == 11
    assert all(len(c.data) <= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE for c in chunks)
    assert b"".join(bytes(c.data) for c in chunks) == bytes(payload.data)
    back = records.decode_reply(content)
    assert (back.client, back.rank, back.num_examples, back.round) == (3, RANK, 100, 2)
    assert back.tensors.keys() == tensors.keys()
    assert all(torch.equal(back.tensors[k], t) for k, t in tensors.items())


def test_1b_rank64_broadcast_round_trips_through_the_task():
    adapter = _adapter(1)
    content = records.encode_task(1, 0, RANK, 7, TrainPlan(RANK, (RANK,)), Broadcast(adapter), "{}")
    assert sum(a.numpy().nbytes for a in content[records.ADAPTER].values()) == EXPECTED_BYTES
    task = records.decode_task(content)
    assert task.rank == RANK and all(torch.equal(task.broadcast.adapter[k], t) for k, t in adapter.items())


@pytest.mark.slow
def test_payload_bench_round_trip_in_a_real_flower_run(tmp_path):
    """bench/flower_payload.py at tiny shapes: task down, update up, bit-exact (a ~30 s Flower run)."""
    from bench import flower_payload

    out = tmp_path / "payload.json"
    assert flower_payload.main(["--model", "tiny", "--rank", "8", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["bit_exact"] is True and res["download_bytes"] == res["expected_bytes"]
    assert res["expected_bytes"] < res["upload_bytes"] < res["expected_bytes"] + 200 * 2 * res["modules"]
