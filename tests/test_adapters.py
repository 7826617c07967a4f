"""PEFT glue on tiny-llama: prefix state, truncation mask, base deltas, standard PEFT export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from prelort import adapters
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
    mods = adapters.adapted_modules(lora)
    assert len(mods) == 2 * 4
    assert mods["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert mods["model.layers.1.self_attn.k_proj"] == (32, 64)  # 2 kv heads x head_dim 16
    assert all(not m.startswith("base_model") for m in mods)
    # the scaling is alpha / R for the one adapter, and only LoRA factors train
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(ALPHA / R)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert adapters.global_rank(lora) == R and adapters.active_rank(lora) == R


def test_attach_rejects_unknown_targets_and_double_attach(tiny_model, lora):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="target_modules"):
        adapters.attach_lora(copy.deepcopy(model), ["no_such_proj"], 4, 8.0)
    with pytest.raises(ValueError, match="already carries LoRA"):
        adapters.attach_lora(lora.base_model.model, TARGETS, 4, 8.0)


def test_load_read_round_trip_and_zeroed_tail(lora):
    mods = adapters.adapted_modules(lora)
    full = random_adapter(mods, R)
    adapters.load_adapter_state(lora, full, R)
    back = adapters.read_adapter_state(lora, R)
    assert back.keys() == full.keys()
    for k in full:
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], full[k])
    # loading rank 3 keeps the prefix and zeroes dims 3..R-1 of both factors
    small = {k: (v[:3] if k.endswith("lora_A") else v[:, :3]) for k, v in random_adapter(mods, R, seed=1).items()}
    adapters.load_adapter_state(lora, small, 3)
    assert adapters.active_rank(lora) == 3 and adapters.get_truncation(lora) == 3
    whole = adapters.read_adapter_state(lora, R)
    for k, v in small.items():
        if k.endswith("lora_A"):
            assert torch.equal(whole[k][:3], v) and torch.count_nonzero(whole[k][3:]) == 0
        else:
            assert torch.equal(whole[k][:, :3], v) and torch.count_nonzero(whole[k][:, 3:]) == 0
    # the copy is detached: changing it does not touch the model
    back = adapters.read_adapter_state(lora, 3)
    next(iter(back.values())).add_(1.0)
    assert torch.equal(adapters.read_adapter_state(lora, 3)[next(iter(back))], small[next(iter(back))])


def test_load_validates_keys_and_shapes(lora):
    mods = adapters.adapted_modules(lora)
    good = random_adapter(mods, 4)
    missing = dict(good)
    missing.pop(next(iter(good)))
    with pytest.raises(ValueError, match="miss"):
        adapters.load_adapter_state(lora, missing, 4)
    with pytest.raises(ValueError, match="unknown"):
        adapters.load_adapter_state(lora, {**good, "model.nowhere.lora_A": torch.zeros(4, 64)}, 4)
    with pytest.raises(ValueError, match="does not fit rank 6"):
        adapters.load_adapter_state(lora, good, 6)
    with pytest.raises(ValueError, match=r"outside \[1, 8\]"):
        adapters.load_adapter_state(lora, random_adapter(mods, 9), 9)
    bad = dict(good)
    k = key("model.layers.0.self_attn.q_proj", "lora_B")
    bad[k] = torch.zeros(63, 4)
    with pytest.raises(ValueError, match="q_proj.lora_B"):
        adapters.load_adapter_state(lora, bad, 4)
    nan = dict(good)
    nan[k] = torch.full((64, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        adapters.load_adapter_state(lora, nan, 4)


def test_mask_zeroes_exactly_the_dims_from_t(lora):
    mods = adapters.adapted_modules(lora)
    adapters.load_adapter_state(lora, random_adapter(mods, R), R)
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    a_out = {}
    handle = layer.lora_A["default"].register_forward_hook(lambda m, i, o: a_out.__setitem__("o", o))
    try:
        for t in (1, 3, R):
            with adapters.truncated(lora, t):
                with torch.no_grad():
                    layer(x)
            out = a_out["o"]
            assert torch.count_nonzero(out[:, t:]) == 0
            assert torch.all(out[:, :t] != 0)
    finally:
        handle.remove()
    assert adapters.get_truncation(lora) == R  # restored after the context
    with pytest.raises(ValueError, match="truncation 9"):
        adapters.set_truncation(lora, 9)


def test_truncated_function_equals_the_prefix_adapter(lora):
    """Masking to t computes W x + s B[:, :t] A[:t] x, i.e. loading only the prefix."""
    mods = adapters.adapted_modules(lora)
    full = random_adapter(mods, R)
    x = ids()
    adapters.load_adapter_state(lora, full, R)
    with adapters.truncated(lora, 3):
        masked = logits(lora, x)
    unmasked = logits(lora, x)
    adapters.load_adapter_state(lora, full, 3)  # prefix only, dims 3.. zero
    prefix = logits(lora, x)
    assert torch.allclose(masked, prefix, atol=1e-6)
    assert (unmasked - masked).abs().max() > 1e-3  # the tail really matters


def test_gradients_reach_dim_i_only_from_truncations_above_i(lora):
    mods = adapters.adapted_modules(lora)
    adapters.load_adapter_state(lora, random_adapter(mods, R), R)
    adapters.set_truncation(lora, 3)
    lora.train()
    loss = lora(input_ids=ids()).logits.square().mean()
    loss.backward()
    layer = lora.base_model.model.model.layers[1].self_attn.v_proj
    ga, gb = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert torch.count_nonzero(ga[3:]) == 0 and torch.count_nonzero(gb[:, 3:]) == 0
    assert torch.count_nonzero(ga[:3]) > 0 and torch.count_nonzero(gb[:, :3]) > 0


def test_base_delta_adds_exactly_and_restores_w0(lora):
    mods = adapters.adapted_modules(lora)
    name = "model.layers.0.self_attn.o_proj"
    weight = lora.base_model.model.model.layers[0].self_attn.o_proj.base_layer.weight
    other = lora.base_model.model.model.layers[1].self_attn.o_proj.base_layer.weight
    w0, other0 = weight.detach().clone(), other.detach().clone()
    delta = torch.randn(*mods[name], generator=torch.Generator().manual_seed(3))
    adapters.set_base_delta(lora, {key(name, "delta"): delta})
    assert torch.equal(weight, w0 + delta)
    assert torch.equal(other, other0)
    adapters.set_base_delta(lora, {key(name, "delta"): 2 * delta})  # replaces, does not accumulate
    assert torch.equal(weight, w0 + 2 * delta)
    adapters.set_base_delta(lora, None)
    assert torch.equal(weight, w0) and torch.equal(other, other0)
    with pytest.raises(ValueError, match="shape"):
        adapters.set_base_delta(lora, {key(name, "delta"): torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="unknown"):
        adapters.set_base_delta(lora, {"model.layers.0.mlp.up_proj.delta": torch.zeros(128, 64)})


def test_apply_broadcast_sets_delta_and_adapter(lora):
    mods = adapters.adapted_modules(lora)
    adapter = {k: (v[:2] if k.endswith("lora_A") else v[:, :2]) for k, v in random_adapter(mods, R).items()}
    name = "model.layers.1.self_attn.q_proj"
    delta = torch.ones(*mods[name])
    w0 = lora.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight.detach().clone()
    adapters.apply_broadcast(lora, Broadcast(adapter=adapter, base_delta={key(name, "delta"): delta}), 2)
    assert adapters.active_rank(lora) == 2
    assert torch.equal(lora.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight, w0 + 1)
    back = adapters.read_adapter_state(lora, 2)
    assert all(torch.equal(back[k], adapter[k]) for k in adapter)
    adapters.apply_broadcast(lora, Broadcast(adapter=adapter), 2)
    assert torch.equal(lora.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight, w0)


@pytest.mark.parametrize("t", [1, 3, 8])
def test_exported_rank_t_adapter_matches_masked_global(tiny_model, lora, tmp_path, t):
    base_model, _ = tiny_model
    mods = adapters.adapted_modules(lora)
    full = random_adapter(mods, R, seed=7)
    adapters.load_adapter_state(lora, full, R)
    x = ids(1)
    with adapters.truncated(lora, t):
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
    mods = adapters.adapted_modules(lora)
    adapters.load_adapter_state(lora, random_adapter(mods, R), R)
    twin = copy.deepcopy(lora)
    x = ids(2)
    full = logits(lora, x)
    adapters.set_truncation(twin, 2)
    assert adapters.get_truncation(lora) == R
    assert torch.equal(logits(lora, x), full)  # the original is untouched by the copy's mask
    with adapters.truncated(lora, 2):
        assert torch.equal(logits(twin, x), logits(lora, x))
