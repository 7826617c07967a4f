"""Model names without loading a model: the offline aliases, their hub ids, and a fast check that a name can
be loaded at all (imports neither torch nor transformers, so ``prelort run`` rejects a mistyped alias at once).

A name that is neither an alias nor a local path is a Hugging Face hub id. Offline (``HF_HUB_OFFLINE=1``, or
the hub found unreachable: one connection attempt per process, a few seconds at most) it loads only from the
local hub cache; otherwise the name is refused here with the closest aliases, instead of a minute of retries.
"""

from __future__ import annotations

import difflib
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
TINY = "tiny-llama"
ALIASES = (SMOLLM2, QWEN, TINY)

# The hub models the offline aliases are (GGUF conversions of): what an exported adapter records as its base
# model, so AutoPeftModelForCausalLM can fetch the base online. tiny-llama is random: no hub model.
HUB_IDS = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct", QWEN: "Qwen/Qwen2.5-Coder-0.5B-Instruct"}

REACHABILITY_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")
_reachable: bool | None = None


class ModelLoadError(OSError):
    """The model named in the config cannot be loaded; the message says why and what to do."""


def hub_id(name: str) -> str:
    """The hub id of an alias (the name itself for anything else)."""
    return HUB_IDS.get(name, name)


def hub_offline_by_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False under HF_HUB_OFFLINE). Tried once per
    process, with a time limit that covers name resolution too."""
    global _reachable
    if hub_offline_by_env():
        return False
    if _reachable is None:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        result: list[bool] = []

        def attempt() -> None:
            try:
                socket.create_connection((host, 443), timeout=REACHABILITY_TIMEOUT_S).close()
                result.append(True)
            except OSError:
                result.append(False)

        worker = threading.Thread(target=attempt, daemon=True)  # getaddrinfo itself has no timeout
        worker.start()
        worker.join(REACHABILITY_TIMEOUT_S)
        _reachable = bool(result and result[0])
    return _reachable


def in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the local Hugging Face cache holds ``filename`` of ``repo_id``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False


def closest_aliases(name: str) -> list[str]:
    return difflib.get_close_matches(name.lower(), ALIASES, n=3, cutoff=0.4)


def _did_you_mean(name: str) -> str:
    close = closest_aliases(name)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"the aliases are {', '.join(ALIASES)}"


def is_hub_name(name: str) -> bool:
    """A name that is not an alias and not an existing local path (a hub id, or a mistake)."""
    return name not in ALIASES and not Path(name).expanduser().exists()


def check_model_name(name: str, gguf_file: str | None = None) -> None:
    """Raise :class:`ModelLoadError` (in seconds, offline) when ``name`` is a hub id that cannot load here:
    offline and not in the local hub cache. Aliases, local paths and (online) hub ids pass."""
    if not is_hub_name(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return  # an alias, a path, or a missing path (its loader says so)
    if in_hub_cache(name, gguf_file or "config.json") or hub_reachable():
        return
    why = "HF_HUB_OFFLINE is set" if hub_offline_by_env() else "the Hugging Face hub is not reachable"
    raise ModelLoadError(
        f"model.name {name!r} is not an alias, not a local path, and not a hub model in the local "
        f"cache ({why}); {_did_you_mean(name)}"
    )


def hub_load_failed(name: str, error: BaseException) -> ModelLoadError:
    """The error for a hub id that did not load although the hub was reachable."""
    return ModelLoadError(
        f"model.name {name!r} is not an alias, not a local path, and did not load from the hub "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
        f"{_did_you_mean(name)}"
    )
