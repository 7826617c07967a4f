"""prelort: federated LoRA fine-tuning of LLMs with heterogeneous client ranks (PreLort, arXiv 2606.15963)."""

__version__ = "0.1.0"
