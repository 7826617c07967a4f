"""PEFT glue on tiny-llama: prefix state, truncation mask, base deltas, standard PEFT export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from prelort import adapters
from prelort.adapters import LoraAdapter
from prelort.methods.base import Broadcast, key

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
R = 8
ALPHA = 16.0


def random_adapter(modules: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_out, d_in) in modules.items():
        out[key(m, "lora_A")] = torch.randn(rank, d_in, generator=g) * 0.2
        out[key(m, "lora_B")] = torch.randn(d_out, rank, generator=g) * 0.2
    return out


@pytest.fixture()
def lora(fresh_tiny_model):
    model, tok = fresh_tiny_model
    return adapters.attach_lora(model, TARGETS, R, ALPHA)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def test_attach_names_modules_in_base_model_naming(lora):
    mods = LoraAdapter(lora).modules
    assert len(mods) == 2 * 4
    assert mods["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert mods["model.layers.1.self_attn.k_proj"] == (32, 64)  # 2 kv heads x head_dim 16
    assert all(not m.startswith("base_model") for m in mods)
    # the scaling is alpha / R for the one adapter, and only LoRA factors train
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(ALPHA / R)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert LoraAdapter(lora).global_rank == R and LoraAdapter(lora).active_rank == R


def test_attach_rejects_unknown_targets_and_double_attach(tiny_model, lora):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="target_modules"):
        adapters.attach_lora(copy.deepcopy(model), ["no_such_proj"], 4, 8.0)
    with pytest.raises(ValueError, match="already carries LoRA"):
        adapters.attach_lora(lora.base_model.model, TARGETS, 4, 8.0)


def test_lora_adapter_is_a_handle_on_the_models_own_state(tiny_model, lora):
    """LoraAdapter(model) finds the bookkeeping attach_lora left on the model: handles share it."""
    with pytest.raises(ValueError, match="no prelort LoRA adapter"):
        LoraAdapter(tiny_model[0])
    one, other = LoraAdapter(lora), LoraAdapter(lora)
    assert one.model is lora
    one.set_truncation(3)
    assert other.truncation == 3
    other.set_truncation(R)
    assert [p for pair in one.factor_pairs() for p in pair] == one.parameters()
    assert all(a.shape[0] == R and b.shape[1] == R for a, b in one.factor_pairs())


def test_load_read_round_trip_and_zeroed_tail(lora):
    mods = LoraAdapter(lora).modules
    full = random_adapter(mods, R)
    LoraAdapter(lora).load_state(full, R)
    back = LoraAdapter(lora).read_state(R)
    assert back.keys() == full.keys()
    for k in full:
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], full[k])
    # loading rank 3 keeps the prefix and zeroes dims 3..R-1 of both factors
    small = {k: (v[:3] if k.endswith("lora_A") else v[:, :3]) for k, v in random_adapter(mods, R, seed=1).items()}
    LoraAdapter(lora).load_state(small, 3)
    assert LoraAdapter(lora).active_rank == 3 and LoraAdapter(lora).truncation == 3
    whole = LoraAdapter(lora).read_state(R)
    for k, v in small.items():
        if k.endswith("lora_A"):
            assert torch.equal(whole[k][:3], v) and torch.count_nonzero(whole[k][3:]) == 0
        else:
            assert torch.equal(whole[k][:, :3], v) and torch.count_nonzero(whole[k][:, 3:]) == 0
    # the copy is detached: changing it does not touch the model
    back = LoraAdapter(lora).read_state(3)
    next(iter(back.values())).add_(1.0)
    assert torch.equal(LoraAdapter(lora).read_state(3)[next(iter(back))], small[next(iter(back))])


def test_load_validates_keys_and_shapes(lora):
    mods = LoraAdapter(lora).modules
    good = random_adapter(mods, 4)
    missing = dict(good)
    missing.pop(next(iter(good)))
    with pytest.raises(ValueError, match="miss"):
        LoraAdapter(lora).load_state(missing, 4)
    with pytest.raises(ValueError, match="unknown"):
        LoraAdapter(lora).load_state({**good, "model.nowhere.lora_A": torch.zeros(4, 64)}, 4)
    with pytest.raises(ValueError, match="does not fit rank 6"):
        LoraAdapter(lora).load_state(good, 6)
    with pytest.raises(ValueError, match=r"outside \[1, 8\]"):
        LoraAdapter(lora).load_state(random_adapter(mods, 9), 9)
    bad = dict(good)
    k = key("model.layers.0.self_attn.q_proj", "lora_B")
    bad[k] = torch.zeros(63, 4)
    with pytest.raises(ValueError, match="q_proj.lora_B"):
        LoraAdapter(lora).load_state(bad, 4)
    nan = dict(good)
    nan[k] = torch.full((64, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        LoraAdapter(lora).load_state(nan, 4)


def test_mask_zeroes_exactly_the_dims_from_t(lora):
    mods = LoraAdapter(lora).modules
    LoraAdapter(lora).load_state(random_adapter(mods, R), R)
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    a_out = {}
    handle = layer.lora_A["default"].register_forward_hook(lambda m, i, o: a_out.__setitem__("o", o))
    try:
        for t in (1, 3, R):
            with LoraAdapter(lora).truncated(t):
                with torch.no_grad():
                    layer(x)
            out = a_out["o"]
            assert torch.count_nonzero(out[:, t:]) == 0
            assert torch.all(out[:, :t] != 0)
    finally:
        handle.remove()
    assert LoraAdapter(lora).truncation == R  # restored after the context
    with pytest.raises(ValueError, match="truncation 9"):
        LoraAdapter(lora).set_truncation(9)


def test_truncated_function_equals_the_prefix_adapter(lora):
    """Masking to t computes W x + s B[:, :t] A[:t] x, i.e. loading only the prefix."""
    mods = LoraAdapter(lora).modules
    full = random_adapter(mods, R)
    x = ids()
    LoraAdapter(lora).load_state(full, R)
    with LoraAdapter(lora).truncated(3):
        masked = logits(lora, x)
    unmasked = logits(lora, x)
    LoraAdapter(lora).load_state(full, 3)  # prefix only, dims 3.. zero
    prefix = logits(lora, x)
    assert torch.allclose(masked, prefix, atol=1e-6)
    assert (unmasked - masked).abs().max() > 1e-3  # the tail really matters


def test_gradients_reach_dim_i_only_from_truncations_above_i(lora):
    mods = LoraAdapter(lora).modules
    LoraAdapter(lora).load_state(random_adapter(mods, R), R)
    LoraAdapter(lora).set_truncation(3)
    lora.train()
    loss = lora(input_ids=ids()).logits.square().mean()
    loss.backward()
    layer = lora.base_model.model.model.layers[1].self_attn.v_proj
    ga, gb = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert torch.count_nonzero(ga[3:]) == 0 and torch.count_nonzero(gb[:, 3:]) == 0
    assert torch.count_nonzero(ga[:3]) > 0 and torch.count_nonzero(gb[:, :3]) > 0


def test_base_delta_adds_exactly_and_restores_w0(lora):
    mods = LoraAdapter(lora).modules
    name = "model.layers.0.self_attn.o_proj"
    weight = lora.base_model.model.model.layers[0].self_attn.o_proj.base_layer.weight
    other = lora.base_model.model.model.layers[1].self_attn.o_proj.base_layer.weight
    w0, other0 = weight.detach().clone(), other.detach().clone()
    delta = torch.randn(*mods[name], generator=torch.Generator().manual_seed(3))
    LoraAdapter(lora).set_base_delta({key(name, "delta"): delta})
    assert torch.equal(weight, w0 + delta)
    assert torch.equal(other, other0)
    LoraAdapter(lora).set_base_delta({key(name, "delta"): 2 * delta})  # replaces, does not accumulate
    assert torch.equal(weight, w0 + 2 * delta)
    LoraAdapter(lora).set_base_delta(None)
    assert torch.equal(weight, w0) and torch.equal(other, other0)
    with pytest.raises(ValueError, match="shape"):
        LoraAdapter(lora).set_base_delta({key(name, "delta"): torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="unknown"):
        LoraAdapter(lora).set_base_delta({"model.layers.0.mlp.up_proj.delta": torch.zeros(128, 64)})


def test_apply_broadcast_sets_delta_and_adapter(lora):
    mods = LoraAdapter(lora).modules
    adapter = {k: (v[:2] if k.endswith("lora_A") else v[:, :2]) for k, v in random_adapter(mods, R).items()}
    name = "model.layers.1.self_attn.q_proj"
    delta = torch.ones(*mods[name])
    w0 = lora.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight.detach().clone()
    LoraAdapter(lora).apply_broadcast(Broadcast(adapter=adapter, base_delta={key(name, "delta"): delta}), 2)
    assert LoraAdapter(lora).active_rank == 2
    assert torch.equal(lora.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight, w0 + 1)
    back = LoraAdapter(lora).read_state(2)
    assert all(torch.equal(back[k], adapter[k]) for k in adapter)
    LoraAdapter(lora).apply_broadcast(Broadcast(adapter=adapter), 2)
    assert torch.equal(lora.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight, w0)


@pytest.mark.parametrize("t", [1, 3, 8])
def test_exported_rank_t_adapter_matches_masked_global(tiny_model, lora, tmp_path, t):
    base_model, _ = tiny_model
    mods = LoraAdapter(lora).modules
    full = random_adapter(mods, R, seed=7)
    LoraAdapter(lora).load_state(full, R)
    x = ids(1)
    with LoraAdapter(lora).truncated(t):
        expected = logits(lora, x)
    out = adapters.export_peft_adapter(full, t, ALPHA / R, "tiny-llama", TARGETS, tmp_path / f"rank-{t}")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == t and cfg["lora_alpha"] == pytest.approx(ALPHA / R * t)
    saved = load_file(out / "adapter_model.safetensors")
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert saved[k].shape == (t, 64)
    assert len(saved) == 2 * len(mods)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(out))
    got = logits(loaded, x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_export_rejects_bad_input(tmp_path):
    a = {"m.lora_A": torch.zeros(2, 4), "m.lora_B": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="cannot give rank 3"):
        adapters.export_peft_adapter(a, 3, 1.0, "x", ["m"], tmp_path)
    with pytest.raises(ValueError, match="needs both"):
        adapters.export_peft_adapter({"m.lora_A": torch.zeros(2, 4)}, 1, 1.0, "x", ["m"], tmp_path)
    with pytest.raises(ValueError, match="not a LoRA factor"):
        adapters.export_peft_adapter({"m.delta": torch.zeros(2, 4)}, 1, 1.0, "x", ["m"], tmp_path)


def test_a_deep_copy_has_its_own_truncation(lora):
    mods = LoraAdapter(lora).modules
    LoraAdapter(lora).load_state(random_adapter(mods, R), R)
    twin = copy.deepcopy(lora)
    x = ids(2)
    full = logits(lora, x)
    LoraAdapter(twin).set_truncation(2)
    assert LoraAdapter(lora).truncation == R
    assert torch.equal(logits(lora, x), full)  # the original is untouched by the copy's mask
    with LoraAdapter(lora).truncated(2):
        assert torch.equal(logits(twin, x), logits(lora, x))
