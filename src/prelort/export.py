"""The formats a rank-t adapter is exported in besides PEFT's: a merged model and a llama.cpp GGUF LoRA adapter.

Both start from the same rank-t prefix as the PEFT export (:func:`prelort.adapters.truncated_factors`) and the
federation's constant scale s (docs/design.md section 1), so each computes exactly dW_t = s * B_t A_t:

* ``merged``: every adapted weight of the base model becomes W + s * B_t A_t (float32), saved with
  ``save_pretrained`` (safetensors, Hugging Face layout) beside the tokenizer's files: an ordinary model that
  ``AutoModelForCausalLM.from_pretrained`` loads without peft or prelort.
* ``gguf-lora``: the factors under llama.cpp's tensor names (``blk.N.attn_q.weight.lora_a`` / ``.lora_b``),
  written with the ``gguf`` package as llama.cpp's ``convert_lora_to_gguf.py`` writes them: A (t x d_in) and
  B (d_out x t) in float32, ``general.type = adapter``, ``adapter.type = lora`` and
  ``adapter.lora.alpha = s * t``, because llama.cpp scales by alpha / t (t read from B's shape) times the
  user's ``--lora-scaled`` factor (1 by default). llama.cpp's llama-architecture GGUFs store q_proj and
  k_proj with their rows permuted per head (convert_hf_to_gguf.py's ``LlamaModel.permute``; transformers
  undoes it when it reads a GGUF), so B of those modules gets the same row permutation:
  (P B) A = P (B A).

Nothing here reads a run directory or parses arguments: the runner and the CLI do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from torch import Tensor, nn

from .model_names import SMOLLM2
from .models import save_dequantised, smollm2_gguf_path

__all__ = [
    "FORMATS",
    "FORMAT_FILES",
    "GGUF_ARCHES",
    "GGUF_LORA_FILE",
    "ExportError",
    "GgufArch",
    "base_gguf_file",
    "check_against_base",
    "files_for",
    "gguf_lora_tensors",
    "llama_permute_rows",
    "merge_into",
    "write_gguf_lora",
    "write_merged",
]

FORMATS = ("peft", "merged", "gguf-lora")
GGUF_LORA_FILE = "adapter_model.gguf"
# What each format writes into its directory (glob patterns; merged: what save_pretrained writes for a model
# and its tokenizer): a directory already holding one is a user's earlier output, replaced only with --force.
FORMAT_FILES: dict[str, tuple[str, ...]] = {
    "peft": ("adapter_config.json", "adapter_model.safetensors"),
    "merged": (
        "config.json",
        "generation_config.json",
        "model*.safetensors",
        "model.safetensors.index.json",
        "tokenizer*",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.*",
    ),
    "gguf-lora": (GGUF_LORA_FILE,),
}


class ExportError(ValueError):
    """An adapter cannot be exported in the asked format (the message says why)."""


# ---------------------------------------------------------------------------------------------
# merged
# ---------------------------------------------------------------------------------------------
def merge_into(model: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor]], scale: float) -> None:
    """W += scale * B @ A in place for every module of ``factors`` (module name -> (A, B), names of the base
    model), computed in float32 (float64 for a float64 model) and stored in the weight's dtype."""
    with torch.no_grad():
        for module, (a, b) in factors.items():
            try:
                layer = model.get_submodule(module)
            except AttributeError:
                raise ExportError(
                    f"the base model has no module {module!r}; was the run made on another base?"
                ) from None
            w = getattr(layer, "weight", None)
            if not isinstance(w, Tensor) or tuple(w.shape) != (b.shape[0], a.shape[1]):
                raise ExportError(
                    f"module {module}: the base weight's shape {None if w is None else tuple(w.shape)} does not "
                    f"match the adapter's {(b.shape[0], a.shape[1])}; was the run made on another base?"
                )
            dtype = torch.promote_types(w.dtype, torch.float32)  # float32 at least, float64 kept
            delta = scale * (b.to(dtype) @ a.to(dtype))
            w.copy_((w.to(dtype) + delta.to(w.device)).to(w.dtype))


def write_merged(model, tokenizer, out_dir: str | Path, *, force: bool = False) -> Path:
    """Save a (merged) model and its tokenizer into ``out_dir`` as ``save_pretrained`` writes them.

    A model transformers read from a GGUF file is saved as the plain float32 model it is. They are written into a
    temporary directory beside ``out_dir`` first, then moved in file by file; unless
    ``force``, a file of the same name already in ``out_dir`` stops the move before anything is replaced.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        save_dequantised(model, tokenizer, tmp)
        written = sorted(p.name for p in tmp.iterdir())
        taken = [name for name in written if (out / name).exists()]
        if taken and not force:
            raise FileExistsError(
                f"--out {out} already holds {', '.join(taken)}; prelort will not overwrite them (choose another "
                "--out, or pass --force to replace them)"
            )
        for name in written:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# gguf-lora
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GgufArch:
    """How llama.cpp names and lays out one Hugging Face architecture: its GGUF ``general.architecture`` and
    whether its converter permutes the rows of q_proj and k_proj (``LlamaModel.permute``)."""

    arch: gguf.MODEL_ARCH
    permutes_qk: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# Hugging Face model_type -> llama.cpp's layout: the architectures of the GGUF bases prelort ships (SmolLM2:
# llama; Qwen2.5-Coder: qwen2, whose converter keeps q/k as they are) and of tiny-llama.
GGUF_ARCHES: dict[str, GgufArch] = {
    "llama": GgufArch(gguf.MODEL_ARCH.LLAMA, permutes_qk=True),
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2, permutes_qk=False),
}


def llama_permute_rows(x: Tensor, n_head: int) -> Tensor:
    """The row permutation llama.cpp's converter applies to a llama q_proj (``n_head`` = attention heads) or
    k_proj (``n_head`` = key/value heads) weight: within each head, rows (first half, second half)
    interleaved, as ``convert_hf_to_gguf.LlamaModel.permute`` does."""
    rows = x.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"{rows} rows cannot be split into {n_head} heads of two halves")
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _gguf_arch(config) -> GgufArch:
    model_type = getattr(config, "model_type", None)
    arch = GGUF_ARCHES.get(model_type)
    if arch is None:
        raise ExportError(
            f"--format gguf-lora supports the architectures {', '.join(sorted(GGUF_ARCHES))} (llama.cpp's tensor "
            f"names and layout for them are known here); this base model is {model_type!r}"
        )
    return arch


def gguf_lora_tensors(factors: Mapping[str, tuple[Tensor, Tensor]], config) -> tuple[GgufArch, dict[str, Tensor]]:
    """llama.cpp's layout of an adapter: (architecture, ``<gguf tensor>.lora_a`` -> A, ``.lora_b`` -> B) from
    ``factors`` (module name -> (A, B)) and the base model's Hugging Face ``config``."""
    arch = _gguf_arch(config)
    names = gguf.get_tensor_name_map(arch.arch, int(config.num_hidden_layers))
    n_head = int(config.num_attention_heads)
    n_kv_head = int(getattr(config, "num_key_value_heads", None) or n_head)
    out: dict[str, Tensor] = {}
    for module, (a, b) in factors.items():
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"module {module} has no llama.cpp tensor name for the {arch.name} architecture")
        if arch.permutes_qk and module.endswith(".q_proj"):
            b = llama_permute_rows(b, n_head)
        elif arch.permutes_qk and module.endswith(".k_proj"):
            b = llama_permute_rows(b, n_kv_head)
        out[f"{name}.lora_a"] = a.to(torch.float32).contiguous()
        out[f"{name}.lora_b"] = b.to(torch.float32).contiguous()
    return arch, out


def check_against_base(arch: GgufArch, tensors: Mapping[str, Tensor], base_gguf: str | Path) -> None:
    """Check the adapter against a GGUF base as llama.cpp will when it loads it: the same architecture, and
    for every pair a base tensor of that name with d_in = A's columns and d_out = B's rows."""
    reader = gguf.GGUFReader(str(base_gguf))
    field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    base_arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if base_arch != arch.name:
        raise ExportError(f"the GGUF base {base_gguf} is a {base_arch!r} model; the adapter is for {arch.name!r}")
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # GGUF order: (d_in, d_out)
    for name, x in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        b = tensors[f"{base}.lora_b"]
        want = (int(x.shape[1]), int(b.shape[0]))
        if base not in shapes:
            raise ExportError(f"the GGUF base {base_gguf} has no tensor {base}; llama.cpp would refuse the adapter")
        if shapes[base] != want:
            raise ExportError(
                f"{base}: {shapes[base]} in the GGUF base {base_gguf}, {want} from the adapter (d_in, d_out)"
            )


def write_gguf_lora(
    factors: Mapping[str, tuple[Tensor, Tensor]],
    scale: float,
    config,
    path: str | Path,
    *,
    base_gguf: str | Path | None = None,
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Write a llama.cpp LoRA adapter (GGUF) computing ``scale * B A`` for every module of ``factors``
    (module name -> (A, B), all of one rank t): ``adapter.lora.alpha = scale * t``. With ``base_gguf`` the
    names and shapes are first checked against that base. The file is written beside ``path`` and renamed
    into place; an existing ``path`` is replaced only with ``force``."""
    ranks = {int(a.shape[0]) for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ExportError(f"every module must have one rank, got {sorted(ranks)}")
    if scale <= 0:
        raise ExportError(f"scale must be positive, got {scale}")
    (t,) = ranks
    arch, tensors = gguf_lora_tensors(factors, config)
    if base_gguf is not None:
        check_against_base(arch, tensors, base_gguf)
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; prelort will not overwrite it (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale) * t)
        if name:
            writer.add_name(name)
        for tensor_name, x in tensors.items():
            writer.add_tensor(tensor_name, x.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def base_gguf_file(model_name: str, gguf_file: str | None) -> Path | None:
    """The GGUF file the base model ``model_name`` is read from, where prelort has one: the shipped SmolLM2,
    a ``.gguf`` path, or ``model.gguf_file`` in a directory (None for the others: their adapters are written
    from the model's config alone)."""
    if model_name == SMOLLM2:
        return smollm2_gguf_path()
    path = Path(model_name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and gguf_file and (path / gguf_file).is_file():
        return path / gguf_file
    return None


def files_for(fmt: str) -> Sequence[str]:
    """The glob patterns of the files a format writes into its directory (:data:`FORMAT_FILES`)."""
    if fmt not in FORMAT_FILES:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    return FORMAT_FILES[fmt]
