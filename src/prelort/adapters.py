"""PEFT glue: one LoRA adapter of the global rank R, prefix state, truncation masks, base deltas, export.

Every client runs ONE PEFT LoRA adapter of rank R = the federation's largest rank with
``lora_alpha = alpha``, so PEFT's scaling is s = alpha / R, the federation's constant scale
(docs/design.md section 1). A client of rank r < R uses the first r dimensions; the others are zero and masked.

Truncation to t is a mask m = 1_{i < t} on the rank dimension, applied to the output of every lora_A
(a forward hook), so the adapted layer computes

    y = W x + s * B diag(m) A x = W x + s * B[:, :t] A[:t, :] x

without copying weights; gradients reach dimension i only from truncations t > i.

Names: ``<module>`` is a module's full name in the BASE model (``model.layers.0.self_attn.q_proj``),
never with PEFT's ``base_model.model.`` prefix; tensors are ``<module>.lora_A`` (r x d_in),
``<module>.lora_B`` (d_out x r) and ``<module>.delta`` (d_out x d_in), as in prelort.methods.base.key.

:func:`attach_lora` makes the PeftModel; :class:`LoraAdapter` (``LoraAdapter(model)``) reads and sets its
ranks, truncation, factors and base deltas.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import Tensor, nn

from . import rank_geometry
from .methods.base import Broadcast, key, split_key

__all__ = ["ADAPTER_NAME", "LoraAdapter", "attach_lora", "export_peft_adapter", "truncated_factors"]

ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."


@dataclass
class _NestedState:
    """Per-model bookkeeping: global rank R, the loaded (active) rank, the truncation in force,
    the LoRA layers by base-model name, and the saved W0 of the adapted base weights."""

    max_rank: int
    layers: dict[str, LoraLayer]
    rank: int
    truncation: int
    masks: dict[tuple[torch.dtype, torch.device], Tensor] = field(default_factory=dict)
    base_w0: dict[str, Tensor] | None = None

    def mask(self, like: Tensor) -> Tensor:
        k = (like.dtype, like.device)
        m = self.masks.get(k)
        if m is None:
            m = self.masks[k] = rank_geometry.rank_mask(
                self.truncation, self.max_rank, dtype=like.dtype, device=like.device
            )
        return m


def _lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    base = peft_model.base_model.model
    return {name: mod for name, mod in base.named_modules() if isinstance(mod, LoraLayer)}


def attach_lora(
    model: nn.Module,
    target_modules: Iterable[str],
    max_rank: int,
    alpha: float,
    dropout: float = 0.0,
) -> PeftModel:
    """Wrap ``model`` (in place, as PEFT does) with one LoRA adapter of rank R = ``max_rank``,
    ``lora_alpha = alpha`` (scaling s = alpha / R, no rslora), A ~ PEFT's kaiming init, B = 0.

    The returned model starts at active rank R with no truncation, in the train/eval mode ``model`` had;
    base parameters stay frozen.
    """
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty: name at least one nn.Linear module (e.g. q_proj)")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("model already carries LoRA layers; attach_lora needs a plain base model")
    config = LoraConfig(
        r=max_rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        use_rslora=False,
        task_type="CAUSAL_LM",
    )
    was_training = model.training
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"no module matches target_modules {targets}: {e}") from e
    layers = _lora_layers(peft_model)
    if not layers:
        raise ValueError(f"no module matches target_modules {targets}")
    st = _NestedState(max_rank=max_rank, layers=layers, rank=max_rank, truncation=max_rank)
    for layer in layers.values():
        # the hook finds the state through its module (no closure), so copy.deepcopy of the whole
        # model gives the copy's hooks the copy's state
        layer.lora_A[ADAPTER_NAME]._prelort_state = st
        layer.lora_A[ADAPTER_NAME].register_forward_hook(_mask_hook)
    peft_model._prelort_state = st
    peft_model.train(was_training)  # get_peft_model may flip it; keep the caller's (eval after load_model)
    return peft_model


def _mask_hook(module: nn.Module, inputs, output: Tensor):
    st: _NestedState = module._prelort_state
    if st.truncation >= st.max_rank:
        return None  # no truncation: leave A's output untouched (no extra work)
    return output * st.mask(output)


def _quantized(layer: LoraLayer) -> bool:
    """Whether the layer's base weight is held quantised (bitsandbytes int8 / 4-bit storage, not a float)."""
    return not layer.get_base_layer().weight.dtype.is_floating_point


def _set_side_delta(base: nn.Module, delta: Tensor | None) -> None:
    """Make the quantised ``base`` layer compute W0 x + delta x (None: W0 x again) through a forward hook
    registered once; the delta is kept in float32 on the layer's device."""
    if not hasattr(base, "_prelort_delta"):
        base.register_forward_hook(_side_delta_hook)
    device = next(base.parameters()).device
    base._prelort_delta = None if delta is None else delta.detach().to(device=device, dtype=torch.float32).clone()


def _side_delta_hook(module: nn.Module, inputs, output: Tensor):
    delta = module._prelort_delta
    if delta is None:
        return None
    return output + torch.nn.functional.linear(inputs[0].to(delta.dtype), delta).to(output.dtype)


def _factors(layer: LoraLayer) -> tuple[Tensor, Tensor]:
    return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight


class LoraAdapter:
    """The prelort LoRA adapter of a model made by :func:`attach_lora`: its ranks, truncation, factors and base
    deltas. ``LoraAdapter(model)`` is a light handle on the bookkeeping the model carries (handles on one
    model share it); ``model`` is the PeftModel itself (forward passes, generation)."""

    def __init__(self, peft_model: nn.Module):
        st = getattr(peft_model, "_prelort_state", None)
        if st is None:
            raise ValueError("model has no prelort LoRA adapter; create it with prelort.adapters.attach_lora")
        self.model = peft_model
        self._st: _NestedState = st

    @property
    def global_rank(self) -> int:
        """R, the rank of the attached adapter."""
        return self._st.max_rank

    @property
    def active_rank(self) -> int:
        """The rank last loaded with :meth:`load_state` (R right after attach_lora)."""
        return self._st.rank

    @property
    def truncation(self) -> int:
        return self._st.truncation

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        """Adapted module name (base-model naming) -> (d_out, d_in)."""
        return {name: (layer.out_features, layer.in_features) for name, layer in self._st.layers.items()}

    def parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA factors (A and B of every adapted module), in a fixed order."""
        out = []
        for layer in self._st.layers.values():
            out.extend(_factors(layer))
        return out

    def factor_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(A, B) of every adapted module, in the order of :meth:`parameters`."""
        return [_factors(layer) for layer in self._st.layers.values()]

    def set_truncation(self, t: int) -> None:
        """Mask the rank dimension to the first ``t`` dims (1 <= t <= active rank). No weights change."""
        st = self._st
        if not 1 <= t <= st.rank:
            raise ValueError(
                f"truncation {t} outside [1, {st.rank}] (active rank {st.rank}, global rank {st.max_rank})"
            )
        if t != st.truncation:
            st.truncation = int(t)
            st.masks.clear()

    @contextmanager
    def truncated(self, t: int) -> Iterator[PeftModel]:
        """``with adapter.truncated(t): ...`` runs the body at truncation t and restores the previous one."""
        previous = self.truncation
        self.set_truncation(t)
        try:
            yield self.model
        finally:
            st = self._st
            st.truncation = min(previous, st.rank)  # the body may have loaded a smaller rank
            st.masks.clear()

    def _check_tensors(self, tensors: Mapping[str, Tensor], rank: int) -> None:
        layers = self._st.layers
        expected = {key(m, k) for m in layers for k in ("lora_A", "lora_B")}
        missing = sorted(expected - tensors.keys())
        unknown = sorted(set(tensors) - expected)
        if unknown:
            more = " ..." if len(unknown) > 5 else ""
            raise ValueError(f"adapter tensors name unknown modules/factors: {unknown[:5]}{more}")
        if missing:
            raise ValueError(f"adapter tensors miss {len(missing)} entries, e.g. {missing[:5]}")
        for name, x in tensors.items():
            module, kind = split_key(name)
            layer = layers[module]
            d_out, d_in = layer.out_features, layer.in_features
            if x.dim() != 2:
                raise ValueError(f"{name}: expected a matrix, got shape {tuple(x.shape)}")
            have = rank_geometry.factor_rank(kind, x, d_out, d_in)
            if have is None or have < rank:
                want = rank_geometry.factor_shape(kind, rank, d_out, d_in)
                raise ValueError(f"{name}: shape {tuple(x.shape)} does not fit rank {rank}: expected {want}")
            if not torch.isfinite(x).all():
                raise ValueError(f"{name}: contains NaN or inf")

    def load_state(self, tensors: Mapping[str, Tensor], rank: int) -> None:
        """Write the rank-``rank`` prefix of ``tensors`` into dims [0, rank), zero dims [rank, R),
        and set the active rank and truncation to ``rank``.

        ``tensors`` has ``<module>.lora_A`` (>= rank x d_in) and ``<module>.lora_B`` (d_out x >= rank) for
        every adapted module; a larger rank is truncated to its prefix.
        """
        st = self._st
        if not 1 <= rank <= st.max_rank:
            raise ValueError(f"rank {rank} outside [1, {st.max_rank}] (the adapter's global rank)")
        self._check_tensors(tensors, rank)
        with torch.no_grad():
            for module, layer in st.layers.items():
                a, b = _factors(layer)
                a.zero_()
                b.zero_()
                a[:rank].copy_(tensors[key(module, "lora_A")][:rank])
                b[:, :rank].copy_(tensors[key(module, "lora_B")][:, :rank])
        st.rank = int(rank)
        st.truncation = int(rank)
        st.masks.clear()

    def read_state(self, rank: int) -> dict[str, Tensor]:
        """Detached float32 CPU copies of the rank-``rank`` prefix: ``<module>.lora_A`` (rank x d_in),
        ``<module>.lora_B`` (d_out x rank)."""
        st = self._st
        if not 1 <= rank <= st.max_rank:
            raise ValueError(f"rank {rank} outside [1, {st.max_rank}] (the adapter's global rank)")
        out: dict[str, Tensor] = {}
        for module, layer in st.layers.items():
            a, b = _factors(layer)
            out[key(module, "lora_A")] = a.detach()[:rank].to(device="cpu", dtype=torch.float32).clone()
            out[key(module, "lora_B")] = b.detach()[:, :rank].to(device="cpu", dtype=torch.float32).clone()
        return out

    def set_base_delta(self, deltas: Mapping[str, Tensor] | None) -> None:
        """Set the frozen base weight of each adapted module to W = W0 + delta (``<module>.delta``,
        d_out x d_in); modules not named, and every module when ``deltas`` is None, get W0 back exactly.

        W0 of the adapted modules is copied the first time this is called (other weights never are). A
        quantised base layer (model.quantization) keeps its W0 as it is and adds the float32 delta beside it,
        y = W0 x + delta x: re-quantising W0 + delta every round would add a new quantisation error each time.
        """
        st = self._st
        if deltas:
            unknown = sorted(
                name for name in deltas if split_key(name)[1] != "delta" or split_key(name)[0] not in st.layers
            )
            if unknown:
                raise ValueError(f"base deltas must be `<adapted module>.delta`; unknown: {unknown[:5]}")
            for name, d in deltas.items():
                layer = st.layers[split_key(name)[0]]
                want = (layer.out_features, layer.in_features)
                if tuple(d.shape) != want:
                    raise ValueError(f"{name}: shape {tuple(d.shape)}, expected {want}")
                if not torch.isfinite(d).all():
                    raise ValueError(f"{name}: contains NaN or inf")
        deltas = deltas or {}
        dense = {m: layer for m, layer in st.layers.items() if not _quantized(layer)}
        for module, layer in st.layers.items():
            if module not in dense:
                _set_side_delta(layer.get_base_layer(), deltas.get(key(module, "delta")))
        if st.base_w0 is None:
            if not any(key(m, "delta") in deltas for m in dense):
                return  # never changed: W is W0 already
            st.base_w0 = {m: layer.get_base_layer().weight.detach().clone() for m, layer in dense.items()}
        with torch.no_grad():
            for module, layer in dense.items():
                w = layer.get_base_layer().weight
                w0 = st.base_w0[module]
                d = deltas.get(key(module, "delta"))
                if d is None:
                    w.copy_(w0)
                else:
                    w.copy_((w0.to(torch.float32) + d.to(device=w0.device, dtype=torch.float32)).to(w.dtype))

    def apply_broadcast(self, broadcast: Broadcast, rank: int) -> None:
        """Start from what a method broadcasts: base delta (or W0) plus the rank-``rank`` adapter."""
        self.set_base_delta(broadcast.base_delta)
        self.load_state(broadcast.adapter, rank)


def truncated_factors(tensors: Mapping[str, Tensor], t: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The rank-``t`` prefix (A[:t] (t x d_in), B[:, :t] (d_out x t), float32 on the CPU) of every module of
    ``tensors`` (``<module>.lora_A`` / ``<module>.lora_B``), by module name in sorted order; a ValueError
    names a module whose factors are missing, misnamed or too small for rank t."""
    if t < 1:
        raise ValueError(f"export rank must be >= 1, got {t}")
    modules: dict[str, dict[str, Tensor]] = {}
    for name, x in tensors.items():
        module, kind = split_key(name)
        if kind not in ("lora_A", "lora_B"):
            raise ValueError(f"{name}: not a LoRA factor (expected <module>.lora_A or <module>.lora_B)")
        modules.setdefault(module, {})[kind] = x
    if not modules:
        raise ValueError("no adapter tensors to export")
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for module, pair in sorted(modules.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"module {module} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.shape[0] < t or b.shape[1] < t or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {module}: factors of shapes {tuple(a.shape)}, {tuple(b.shape)} cannot give rank {t}"
            )
        out[module] = (
            a[:t].detach().to("cpu", torch.float32).contiguous().clone(),
            b[:, :t].detach().to("cpu", torch.float32).contiguous().clone(),
        )
    return out


def export_peft_adapter(
    tensors: Mapping[str, Tensor],
    t: int,
    scale: float,
    base_model_name_or_path: str,
    target_modules: Iterable[str],
    out_dir: str | Path,
) -> Path:
    """Write a standard PEFT LoRA adapter directory of rank ``t`` from the first t dims of ``tensors``.

    With ``lora_alpha = scale * t`` PEFT's scaling is (scale * t) / t = scale, so the exported adapter
    computes s * B[:, :t] A[:t, :], exactly the truncated global adapter. Files: ``adapter_config.json``
    and ``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B``,
    loadable by ``PeftModel.from_pretrained(base, out_dir)`` without prelort.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    state: dict[str, Tensor] = {}
    for module, (a, b) in truncated_factors(tensors, t).items():
        state[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a
        state[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=int(t),
        lora_alpha=float(scale) * int(t),
        lora_dropout=0.0,
        target_modules=sorted(set(target_modules)),
        bias="none",
        use_rslora=False,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
