"""A quantised base (model.quantization int8 / nf4, bitsandbytes) and gradient checkpointing (issue 28).

Federations on tiny-llama (its linear layers are 64, 128 and 32 wide: whole bitsandbytes blocks of 64) with
prelort and FLoRA (the baseline that changes the base weights): they complete, their updates have the float32
shapes of the unquantised run, their exported adapters load on a float32 base.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prelort import adapters
from prelort import config as config_mod
from prelort.adapters import LoraAdapter
from prelort.config import ModelConfig, TrainConfig
from prelort.methods.base import TrainPlan
from prelort.model_names import ModelLoadError
from prelort.models import enable_gradient_checkpointing, load_model, quantize_linear_layers, quantized_modules
from prelort.recipe import load_federation_model
from prelort.runner import run
from prelort.train import train_client

bnb = pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
FAST = [
    "rounds=2",
    "train.local_steps=1",
    "data.num_train=64",
    "data.num_test=8",
    "eval.max_examples=4",
    "eval.max_new_tokens=2",
    "eval.truncation_curve=false",
    "eval.every=2",
    "clients.num=2",
    "clients.per_round=2",
    "clients.ranks=[2,4]",
    "audit=true",
]
METHODS = ("prelort", "flora")
QUANTIZATIONS = ("int8", "nf4")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_cfg(*overrides: str) -> config_mod.Config:
    return config_mod.load(TINY, [*FAST, *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(method, quantization) -> run directory, for the float32 base (none) and both quantisations."""
    out = {}
    for method in METHODS:
        for quantization in ("none", *QUANTIZATIONS):
            d = tmp_path_factory.mktemp(f"{method}-{quantization}") / "run"
            run(tiny_cfg(f"method={method}", f"model.quantization={quantization}"), d, verbose=False)
            out[method, quantization] = d
    return out


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_quantised_federation_completes_with_the_float32_update_shapes(runs, method, quantization, check_run):
    d = runs[method, quantization]
    check_run(d)
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in recs if r.get("kind") == "tier"} == {2}  # eval.every 2: after the last round
    float_run = runs[method, "none"]
    for rnd in (1, 2):
        files = sorted(p.name for p in (d / "updates" / f"round-{rnd}").glob("*.safetensors"))
        assert files and files == sorted(p.name for p in (float_run / "updates" / f"round-{rnd}").glob("*.safetensors"))
        for name in files:
            got = load_file(d / "updates" / f"round-{rnd}" / name)
            want = load_file(float_run / "updates" / f"round-{rnd}" / name)
            assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == {
                k: (tuple(v.shape), torch.float32) for k, v in want.items()
            }
            assert all(torch.isfinite(v).all() for v in got.values())


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_exported_adapter_of_a_quantised_run_loads_on_a_float32_base(runs, tiny_model, quantization):
    from peft import PeftModel

    base, _ = tiny_model
    ids = torch.tensor([[1, 42, 300, 7, 99]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    export = runs["prelort", quantization] / "adapters" / "rank-4"
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(export))
    saved = load_file(export / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for k, v in saved.items():
        assert v.dtype == torch.float32
        assert torch.equal(loaded[k.replace(".weight", ".default.weight")], v)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base_logits)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_every_linear_layer_but_the_head_is_quantised_and_the_factors_stay_float32(quantization):
    cfg = tiny_cfg(f"model.quantization={quantization}")
    base, _, model = load_federation_model(cfg)
    quantised = quantized_modules(base)
    expected = "int8" if quantization == "int8" else "nf4"
    adapter = LoraAdapter(model)
    assert adapter.modules  # the targeted modules
    for module in adapter.modules:
        assert quantised[f"{module}.base_layer"] == expected  # PEFT's LoRA layer wraps the quantised one
    assert len(quantised) == 2 * 7  # q k v o gate up down of both decoder layers
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert base.lm_head.weight is base.model.embed_tokens.weight  # the tie survives
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_backward_through_a_quantised_layer_is_that_of_its_dequantised_weight(quantization):
    """Also after an evaluation in eval mode (the run's base evaluation comes first): bitsandbytes must not
    have switched the layer to an inference-only kernel."""
    import bitsandbytes.functional as bnb_f

    base, _ = load_model(ModelConfig(name="tiny-llama", device="cpu"), quantization)
    with torch.no_grad():
        base(input_ids=torch.tensor([[1, 2, 3]]))
    base.train()
    layer = base.model.layers[0].mlp.down_proj
    if quantization == "nf4":
        weight = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    else:
        weight = layer.state.CB.float() * layer.state.SCB[:, None].float() / 127
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ weight.T
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_a_base_delta_on_a_quantised_base_is_added_beside_the_quantised_weight():
    base, _ = load_model(ModelConfig(name="tiny-llama", device="cpu"), "nf4")
    model = adapters.attach_lora(base, ["q_proj"], 2, 4.0)
    adapter = LoraAdapter(model)
    module = "model.layers.0.self_attn.q_proj"
    layer = adapter._st.layers[module].get_base_layer()
    packed = layer.weight.data.clone()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = layer(x)
        delta = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.1
        adapter.set_base_delta({f"{module}.delta": delta})
        torch.testing.assert_close(layer(x), before + x @ delta.T, atol=1e-5, rtol=1e-5)
        adapter.set_base_delta(None)
        assert torch.equal(layer(x), before)
    assert torch.equal(layer.weight.data, packed)  # never re-quantised


@pytest.mark.parametrize("quantization", ("none", "nf4"))
def test_gradient_checkpointing_gives_the_same_update(quantization):
    examples = [{"input_ids": list(range(100, 140)), "labels": [-100] * 20 + list(range(120, 140))}] * 8
    plan = TrainPlan(rank=4, truncations=(2, 4), mode="sample")
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-2)
    updates = {}
    for checkpointing in (False, True):
        base, _ = load_model(ModelConfig(name="tiny-llama", device="cpu"), quantization)
        if checkpointing:
            enable_gradient_checkpointing(base)
        torch.manual_seed(0)
        model = adapters.attach_lora(base, TARGETS, 4, 8.0, dropout=0.1)
        updates[checkpointing] = train_client(model, examples, plan, cfg, seed=0).tensors
    assert updates[True].keys() == updates[False].keys()
    for k, v in updates[True].items():
        torch.testing.assert_close(v, updates[False][k], atol=1e-6, rtol=1e-5)
    assert any(v.abs().max() > 0 for k, v in updates[True].items() if k.endswith("lora_B"))  # it trained


def test_clear_errors(monkeypatch):
    with pytest.raises(config_mod.ConfigError, match="quantization"):
        tiny_cfg("model.quantization=fp4")
    # ModelLoadError: the CLI's one-line error, exit 2
    with pytest.raises(ModelLoadError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ModelLoadError, match="no nn.Linear layer to quantise"):
        quantize_linear_layers(torch.nn.Sequential(torch.nn.Embedding(4, 4)), "nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"needs bitsandbytes .*pip install 'prelort\[quant\]'"):
        load_model(ModelConfig(name="tiny-llama", device="cpu"), "int8")


def test_cli_names_the_missing_package_in_one_line_with_exit_2(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from prelort.apps.cli import app

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    out = tmp_path / "run"
    sets = [a for s in (*FAST, "model.quantization=nf4") for a in ("--set", s)]
    res = CliRunner().invoke(app, ["run", str(TINY), "--out", str(out), *sets])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "needs bitsandbytes" in lines[0] and "pip install 'prelort[quant]'" in lines[0]
    assert "Traceback" not in res.output
    assert not out.exists()  # nothing written before the model loaded


def test_every_nested_mode_trains_on_a_4bit_base():
    from prelort.methods.base import NESTED_MODES

    base, _ = load_model(ModelConfig(name="tiny-llama", device="cpu"), "nf4")
    torch.manual_seed(0)
    model = adapters.attach_lora(base, TARGETS, 4, 8.0)
    adapter = LoraAdapter(model)
    start = adapter.read_state(4)
    examples = [{"input_ids": list(range(100, 124)), "labels": [-100] * 12 + list(range(112, 124))}] * 4
    for mode in NESTED_MODES:
        adapter.load_state(start, 4)
        result = train_client(
            model,
            examples,
            TrainPlan(rank=4, truncations=(1, 2, 4), mode=mode),
            TrainConfig(local_steps=2, batch_size=2),
            seed=0,
        )
        assert {k: tuple(v.shape) for k, v in result.tensors.items()} == {k: tuple(v.shape) for k, v in start.items()}
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in result.tensors.values())
        assert any(not torch.equal(result.tensors[k], start[k]) for k in start), mode  # it trained


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """tiny-llama saved as a Hugging Face directory: a checkpoint that streams in, as a hub model's does."""
    base, tokenizer = load_model(ModelConfig(name="tiny-llama", device="cpu"), "none")
    out = tmp_path_factory.mktemp("tiny-checkpoint")
    base.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_a_checkpoint_is_quantised_while_it_loads_with_the_layers_and_logits_of_quantising_after(
    tiny_checkpoint, quantization, monkeypatch
):
    import transformers

    from prelort import models

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    streamed, _ = load_model(ModelConfig(name=str(tiny_checkpoint), device="cpu"), quantization)
    # transformers quantised each tensor as it loaded (the float32 model never existed whole)
    assert len(calls) == 1 and calls[0]["quantization_config"] is not None
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", real)
    after, _ = load_model(ModelConfig(name="tiny-llama", device="cpu"), quantization)  # loaded, then quantised
    assert quantized_modules(streamed) == quantized_modules(after)
    assert len(quantized_modules(streamed)) == 2 * 7
    assert getattr(streamed, f"is_loaded_in_{'8bit' if quantization == 'int8' else '4bit'}")
    assert (
        streamed.lm_head.weight.dtype == torch.float32 and streamed.lm_head.weight is streamed.model.embed_tokens.weight
    )
    assert not any(p.requires_grad for p in streamed.parameters())
    ids = torch.tensor([[1, 42, 300, 7, 99, 5]])
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, after(input_ids=ids).logits)


def test_a_federation_on_a_streamed_nf4_checkpoint_sends_the_updates_of_the_quantised_after_run(
    runs, tiny_checkpoint, tmp_path
):
    d = tmp_path / "run"
    run(tiny_cfg("method=prelort", "model.quantization=nf4", f"model.name={tiny_checkpoint}"), d, verbose=False)
    want_dir = runs["prelort", "nf4"] / "updates" / "round-2"
    files = sorted(p.name for p in want_dir.glob("*.safetensors"))
    assert files
    for name in files:
        got, want = load_file(d / "updates" / "round-2" / name), load_file(want_dir / name)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
