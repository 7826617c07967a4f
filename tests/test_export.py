"""prelort.export and `prelort export --format`: the merged model and the llama.cpp GGUF LoRA adapter hold the same
s * B_t A_t as the PEFT export (docs/cli.md "Export formats", README "Run an adapter with llama.cpp, or without peft")."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from typer.testing import CliRunner

from prelort import export
from prelort.adapters import export_peft_adapter, truncated_factors
from prelort.apps.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
cli = CliRunner()
IDS = torch.tensor([[1, 5, 9, 200, 31, 7, 4, 88]])


def random_adapter(model, rank: int, magnitude: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """``<module>.lora_A`` / ``.lora_B`` of rank ``rank`` for the attention projections of ``model``, both
    factors random (B = 0 would hide a wrong layout)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            out[f"{name}.lora_A"] = magnitude * torch.randn(rank, mod.in_features, generator=g)
            out[f"{name}.lora_B"] = magnitude * torch.randn(mod.out_features, rank, generator=g)
    return out


def peft_deltas(peft_dir: Path) -> dict[str, torch.Tensor]:
    """module -> s * B A of a PEFT adapter directory, s = lora_alpha / r from its config."""
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    state = load_file(str(peft_dir / "adapter_model.safetensors"))
    prefix = "base_model.model."
    out = {}
    for name, a in state.items():
        if name.endswith(".lora_A.weight"):
            module = name[len(prefix) : -len(".lora_A.weight")]
            b = state[name.replace(".lora_A.", ".lora_B.")]
            out[module] = s * b @ a
    return out


def gguf_deltas(path: Path, config) -> dict[str, torch.Tensor]:
    """module (Hugging Face name) -> the delta llama.cpp applies from a GGUF LoRA file, (alpha / t) * B A with t
    read from B's shape as llama.cpp does, its q/k rows put back in Hugging Face order by transformers' own
    GGUF reader (the inverse of llama.cpp's converter)."""
    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].parts[-1][0])
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    hf_name = {}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for layer in range(config.num_hidden_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = f"model.layers.{layer}.self_attn.{proj}"
            hf_name[names.get_name(module + ".weight", try_suffixes=(".weight",))] = module
    unpermute = LlamaTensorProcessor(config=config.to_dict())
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        b = tensors[base + ".lora_b"]
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        delta = (alpha / b.shape[1]) * b @ a
        delta = torch.from_numpy(unpermute.process(delta.numpy(), base).weights.copy())
        out[hf_name[base]] = delta
    return out


def gguf_field(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else float(value[0])


# ----------------------------------------------------------------------------------------------
# the formats on a random adapter of substantial size
# ----------------------------------------------------------------------------------------------
def test_gguf_lora_rebuilds_the_peft_delta_of_every_module(tiny_model, tmp_path):
    model, _ = tiny_model
    tensors = random_adapter(model, rank=8)
    t, scale = 4, 16 / 8
    peft_dir = export_peft_adapter(tensors, t, scale, "tiny", ["q_proj", "k_proj", "v_proj", "o_proj"], tmp_path / "p")
    factors = truncated_factors(tensors, t)
    path = export.write_gguf_lora(factors, scale, model.config, tmp_path / "a.gguf", name="test")
    reader = gguf.GGUFReader(str(path))
    assert gguf_field(reader, "general.type") == "adapter"
    assert gguf_field(reader, "general.architecture") == "llama"
    assert gguf_field(reader, "adapter.type") == "lora"
    assert gguf_field(reader, "adapter.lora.alpha") == pytest.approx(scale * t)
    names = sorted(x.name for x in reader.tensors)
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.attn_output.weight.lora_b" in names
    assert len(names) == 2 * 4 * model.config.num_hidden_layers
    # llama.cpp's layout: A is (t x d_in), B (d_out x t), i.e. ne = (d_in, t) and (t, d_out)
    q = next(x for x in reader.tensors if x.name == "blk.0.attn_q.weight.lora_b")
    assert tuple(int(n) for n in q.shape) == (t, model.config.hidden_size)

    want = peft_deltas(peft_dir)
    got = gguf_deltas(path, model.config)
    assert set(got) == set(want)
    for module, delta in want.items():
        assert delta.abs().max() > 0.1
        torch.testing.assert_close(got[module], delta, rtol=1e-5, atol=1e-6, msg=module)
    # the q/k rows really are permuted (4 heads, 2 kv heads): the raw B is not the Hugging Face one
    raw = torch.from_numpy(np.array(q.data))
    assert not torch.allclose(raw, factors["model.layers.0.self_attn.q_proj"][1])


def test_llama_permutation_is_the_inverse_of_transformers_gguf_reader():
    x = torch.arange(8 * 64 * 3, dtype=torch.float32).reshape(64 * 8 // 8, -1)  # 64 rows
    config = {"num_attention_heads": 8, "num_key_value_heads": 2}
    reader = LlamaTensorProcessor(config=config)
    q = export.llama_permute_rows(x, 8)
    k = export.llama_permute_rows(x, 2)
    assert not torch.equal(q, x)
    assert torch.equal(torch.from_numpy(reader.process(q.numpy(), "blk.0.attn_q.weight").weights), x)
    assert torch.equal(torch.from_numpy(reader.process(k.numpy(), "blk.0.attn_k.weight").weights), x)


def test_gguf_lora_of_a_qwen2_base_keeps_q_and_k_rows(tmp_path):
    """qwen2 (the shipped Qwen2.5-Coder's architecture): llama.cpp's names, no row permutation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config)
    factors = truncated_factors(random_adapter(model, 4), 4)
    path = export.write_gguf_lora(factors, 0.5, model.config, tmp_path / "q.gguf")
    reader = gguf.GGUFReader(str(path))
    assert gguf_field(reader, "general.architecture") == "qwen2"
    assert gguf_field(reader, "adapter.lora.alpha") == pytest.approx(2.0)
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    for layer in range(2):
        for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("o_proj", "attn_output")):
            a, b = factors[f"model.layers.{layer}.self_attn.{proj}"]
            assert torch.equal(tensors[f"blk.{layer}.{name}.weight.lora_a"], a)
            assert torch.equal(tensors[f"blk.{layer}.{name}.weight.lora_b"], b)


def test_merged_model_logits_equal_the_peft_model(tiny_model, tmp_path):
    from peft import PeftModel

    model, tokenizer = tiny_model
    tensors = random_adapter(model, rank=8, magnitude=0.5)
    t, scale = 4, 2.0
    peft_dir = export_peft_adapter(tensors, t, scale, "tiny", ["q_proj", "k_proj", "v_proj", "o_proj"], tmp_path / "p")
    merged = copy.deepcopy(model)
    export.merge_into(merged, truncated_factors(tensors, t), scale)
    out = export.write_merged(merged, tokenizer, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(str(out))  # the tokenizer travels with the model
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(peft_dir)).eval()
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
        got = loaded(input_ids=IDS).logits
        base = model(input_ids=IDS).logits
    assert (want - base).abs().max() > 1e-2  # the adapter changes the function
    assert (got - want).abs().max() <= 1e-5


def test_gguf_lora_refuses_an_architecture_without_a_known_layout(tiny_model, tmp_path):
    model, _ = tiny_model
    config = copy.deepcopy(model.config)
    config.model_type = "gpt2"
    factors = truncated_factors(random_adapter(model, 2), 2)
    with pytest.raises(export.ExportError, match="supports the architectures llama, qwen2"):
        export.write_gguf_lora(factors, 1.0, config, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_lora_is_checked_against_its_gguf_base(tiny_model, tmp_path):
    """A base GGUF of the right names and shapes passes; one of another architecture or shape is refused, as
    llama.cpp would refuse the adapter."""
    model, _ = tiny_model
    factors = truncated_factors(random_adapter(model, 2), 2)

    def base_file(arch: str, d_out: int) -> Path:
        path = tmp_path / f"base-{arch}-{d_out}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        for layer in range(model.config.num_hidden_layers):
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                mod = model.get_submodule(
                    f"model.layers.{layer}.self_attn."
                    + {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}[name]
                )
                rows = d_out if name == "attn_q" else mod.out_features
                w.add_tensor(f"blk.{layer}.{name}.weight", np.zeros((rows, mod.in_features), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    good = base_file("llama", model.config.hidden_size)
    export.write_gguf_lora(factors, 1.0, model.config, tmp_path / "ok.gguf", base_gguf=good)
    with pytest.raises(export.ExportError, match="is a 'qwen2' model"):
        export.write_gguf_lora(factors, 1.0, model.config, tmp_path / "x.gguf", base_gguf=base_file("qwen2", 64))
    with pytest.raises(export.ExportError, match=r"blk.0.attn_q.weight: \(64, 32\) in the GGUF base"):
        export.write_gguf_lora(factors, 1.0, model.config, tmp_path / "y.gguf", base_gguf=base_file("llama", 32))
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


# ----------------------------------------------------------------------------------------------
# `prelort export --format` on a run
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("export") / "run"
    sets = {
        "rounds": 1,
        "train.local_steps": 2,
        "train.lr": 0.05,  # a visible adapter after two steps
        "data.num_train": 64,
        "data.num_test": 8,
        "eval.max_examples": 4,
        "eval.max_new_tokens": 2,
        "eval.truncation_curve": "false",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    res = cli.invoke(app, ["run", TINY, "--out", str(d), "--quiet", *args])
    assert res.exit_code == 0, res.output
    return d


def export_cmd(run: Path, fmt: str, out: Path, *extra: str):
    return cli.invoke(app, ["export", str(run), "--rank", "4", "--format", fmt, "--out", str(out), *extra])


def test_cli_exports_agree_with_the_peft_export(run_dir, tmp_path, tiny_model):
    from peft import PeftModel

    model, _ = tiny_model
    res = export_cmd(run_dir, "peft", tmp_path / "peft")
    assert res.exit_code == 0, res.output
    res = export_cmd(run_dir, "merged", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    assert "merged model" in res.output
    res = export_cmd(run_dir, "gguf-lora", tmp_path / "gguf")
    assert res.exit_code == 0, res.output
    assert "llama.cpp LoRA adapter" in res.output and "--lora" in res.output

    want = peft_deltas(tmp_path / "peft")
    assert max(d.abs().max() for d in want.values()) > 1e-4  # the run moved the adapter
    got = gguf_deltas(tmp_path / "gguf" / export.GGUF_LORA_FILE, model.config)
    assert set(got) == set(want)
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-5, atol=1e-7, msg=module)

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert (merged(input_ids=IDS).logits - peft_model(input_ids=IDS).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("fmt", ["peft", "merged", "gguf-lora"])
def test_cli_export_never_overwrites_without_force(run_dir, tmp_path, fmt):
    out = tmp_path / "out"
    assert export_cmd(run_dir, fmt, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = export_cmd(run_dir, fmt, out)
    assert res.exit_code == 2
    assert "prelort will not overwrite them" in res.output and "--force" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = export_cmd(run_dir, fmt, out, "--force")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_cli_export_refuses_an_unknown_format(run_dir, tmp_path):
    res = export_cmd(run_dir, "onnx", tmp_path / "o")
    assert res.exit_code == 2 and "--format 'onnx' is not one of peft, merged, gguf-lora" in res.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python), on the shipped SmolLM2 GGUF
# ----------------------------------------------------------------------------------------------
# Tolerances measured on this prompt (13 tokens) with a random rank-8 adapter exported at rank 4, s = 2, factors
# ~ N(0, 0.05^2), which moves PeftModel's logits by up to 9.0:
# * on a float32 copy of the GGUF llama.cpp's logits are within 0.024 of the float32 model's without the adapter
#   (llama.cpp's float16 KV cache) and within 0.015 with it; the change the adapter makes differs by 0.3% (relative
#   L2 norm of the difference of the changes), against 36% with q/k rows left unpermuted and 153% with twice the
#   scale (max logit gaps 3.7 and 15.3);
# * on the shipped Q4_1 GGUF llama.cpp also quantises the activations (Q8_1 in its Q4_1 matmuls) and differs from
#   the float32 model by up to 1.36 without any adapter: the changes differ by 13% with the adapter as exported,
#   39% with q/k rows left unpermuted, 154% with twice the scale.
FLOAT32_MAX_LOGIT_GAP = 0.05
FLOAT32_RELATIVE_TOLERANCE = 0.02
Q4_RELATIVE_TOLERANCE = 0.2


def llama_cpp_logits(llama_cpp, gguf_path: Path, ids: list[int], lora: Path | None) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        lora_path=str(lora) if lora else None,
        n_ctx=64,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def float32_copy(src: Path, dst: Path) -> Path:
    """The GGUF ``src`` with every tensor dequantised to float32 (metadata as it was)."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def smollm2_logits(tmp_path_factory):
    """``logits(lora=None, base=shipped Q4_1 GGUF)`` by llama.cpp and by transformers (with the PEFT adapter of the
    same factors) on one prompt, for a random adapter exported both ways."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama-cpp]')"
    )
    from peft import PeftModel

    from prelort.config import ModelConfig
    from prelort.models import load_model, smollm2_gguf_path

    tmp = tmp_path_factory.mktemp("smollm2")
    shipped = smollm2_gguf_path()
    model, tokenizer = load_model(ModelConfig(name="smollm2-135m-instruct", device="cpu"))
    tensors = random_adapter(model, rank=8, magnitude=0.05)
    t, scale = 4, 2.0
    peft_dir = export_peft_adapter(tensors, t, scale, "smol", ["q_proj", "k_proj", "v_proj", "o_proj"], tmp / "p")
    lora = export.write_gguf_lora(truncated_factors(tensors, t), scale, model.config, tmp / "a.gguf", base_gguf=shipped)
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(peft_dir)).eval()
        hf = {
            None: model(input_ids=torch.tensor([ids])).logits[0].double().numpy(),
            lora: peft_model(input_ids=torch.tensor([ids])).logits[0].double().numpy(),
        }
    bases = {"q4_1": shipped, "f32": float32_copy(shipped, tmp / "smollm2-f32.gguf")}
    cpp = {(b, a): llama_cpp_logits(llama_cpp, path, ids, a) for b, path in bases.items() for a in (None, lora)}
    return hf, cpp, lora


@pytest.mark.slow
def test_llama_cpp_on_a_float32_base_computes_the_peft_models_logits(smollm2_logits):
    hf, cpp, lora = smollm2_logits
    assert np.abs(hf[lora] - hf[None]).max() > 1.0  # the adapter changes the function
    assert np.abs(cpp[("f32", lora)] - hf[lora]).max() < FLOAT32_MAX_LOGIT_GAP
    change_hf = hf[lora] - hf[None]
    change_cpp = cpp[("f32", lora)] - cpp[("f32", None)]
    assert np.linalg.norm(change_cpp - change_hf) / np.linalg.norm(change_hf) < FLOAT32_RELATIVE_TOLERANCE


@pytest.mark.slow
def test_llama_cpp_on_the_shipped_q4_gguf_changes_the_logits_as_peft_does(smollm2_logits):
    hf, cpp, lora = smollm2_logits
    change_hf = hf[lora] - hf[None]
    change_cpp = cpp[("q4_1", lora)] - cpp[("q4_1", None)]
    relative = np.linalg.norm(change_cpp - change_hf) / np.linalg.norm(change_hf)
    assert np.abs(change_hf).max() > 1.0
    assert relative < Q4_RELATIVE_TOLERANCE, relative


@pytest.mark.slow
def test_merged_model_of_a_gguf_base_equals_the_peft_model_to_float32_rounding(tmp_path):
    """A base transformers reads from a GGUF file (here the shipped SmolLM2 as ``model.gguf_file``) merges and saves
    as a plain model. Over 30 layers float32 rounding alone moves PeftModel's logits by ~4e-4 (against float64), so
    the merged model must agree with PeftModel within that rounding, not within 1e-5 as on tiny-llama."""
    from peft import PeftModel

    from prelort.config import ModelConfig
    from prelort.models import load_model, smollm2_gguf_path

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "smol.gguf").symlink_to(smollm2_gguf_path())
    model, tokenizer = load_model(ModelConfig(name=str(tmp_path / "base"), gguf_file="smol.gguf", device="cpu"))
    assert export.base_gguf_file(str(tmp_path / "base"), "smol.gguf") == tmp_path / "base" / "smol.gguf"
    tensors = random_adapter(model, rank=8, magnitude=0.05)
    t, scale = 4, 2.0
    peft_dir = export_peft_adapter(tensors, t, scale, "smol", ["q_proj", "k_proj", "v_proj", "o_proj"], tmp_path / "p")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(peft_dir)).eval()
    merged = copy.deepcopy(model)
    export.merge_into(merged, truncated_factors(tensors, t), scale)
    out = export.write_merged(merged, tokenizer, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        want = peft_model(input_ids=IDS).logits
        rounding = (want.double() - copy.deepcopy(peft_model).double()(input_ids=IDS).logits).abs().max()
        got = loaded(input_ids=IDS).logits
        base = model(input_ids=IDS).logits
    assert (want - base).abs().max() > 1.0
    assert (got - want).abs().max() <= rounding
