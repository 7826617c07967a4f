"""The ClientApp's per-site quantisation (node-config ``quantization``, issue 28): a node loads its base at its own
setting (else its clients.sites entry's, else model.quantization), keeps at most one model per setting, and
refuses a setting outside none / int8 / nf4 with the reason."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("flwr")
pytest.importorskip("bitsandbytes")

from tests.site_files import federation, write_sites  # noqa: E402

from prelort.apps import clientapp  # noqa: E402
from prelort.config import from_dict  # noqa: E402
from prelort.models import quantized_modules  # noqa: E402


@pytest.fixture(autouse=True)
def _empty_caches():
    """Each test starts from a fresh ClientApp process's caches, and leaves none of its models behind."""
    for cache in (clientapp._MODEL_CACHE, clientapp._PARTITION_CACHE, clientapp._SPLIT_CACHE):
        cache.clear()
    yield
    for cache in (clientapp._MODEL_CACHE, clientapp._PARTITION_CACHE, clientapp._SPLIT_CACHE):
        cache.clear()


def _config(**sections) -> dict:
    """A resolved config as a task carries it: two clients splitting the built-in suite."""
    data = federation({"clients": {"num": 2, "per_round": 2, "ranks": [2, 4]}, **sections})
    return from_dict(data).to_dict()


def _node(partition: int = 0, **keys) -> dict:
    return {"partition-id": partition, "num-partitions": 2, **keys}


def test_node_config_quantization_loads_the_nodes_base_at_that_setting_one_model_per_setting():
    config = _config()
    _, nf4, examples = clientapp.client_state(config, 0, _node(quantization="nf4"))
    assert examples and set(quantized_modules(nf4).values()) == {"nf4"}
    _, plain, _ = clientapp.client_state(config, 1, _node(1))  # no key: model.quantization (none)
    assert not quantized_modules(plain)
    assert clientapp.client_state(config, 0, _node(quantization="nf4"))[1] is nf4  # loaded once per setting
    assert clientapp._MODEL_CACHE["models"].settings() == ["nf4", "none"]


def test_without_the_key_a_node_playing_a_site_follows_its_clients_sites_entry(tmp_path):
    files = write_sites(tmp_path)
    sites = [
        {"data_path": str(files["alpha"]["data"]), "rank": 2, "quantization": "int8"},
        {"data_path": str(files["bravo"]["data"]), "rank": 8},
    ]
    config = from_dict(federation({"clients": {"sites": sites}})).to_dict()
    _, model, examples = clientapp.client_state(config, 0, _node())
    assert len(examples) == files["alpha"]["n"] and set(quantized_modules(model).values()) == {"int8"}
    assert clientapp.site_quantization(from_dict(config), _node(quantization="none"), 0) == "none"  # the node's first


@pytest.mark.parametrize("value", ["fp4", "NF4", 4, True])
def test_a_quantization_outside_the_choices_is_refused_with_the_reason(value):
    reason = f"this site's node-config quantization {value!r} is not one of none, int8, nf4"
    with pytest.raises(ValueError, match=re.escape(reason)):
        clientapp.client_state(_config(), 0, _node(quantization=value))
    assert not clientapp._MODEL_CACHE  # refused before any model loads
