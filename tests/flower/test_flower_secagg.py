"""Secure aggregation of prelort's two plain sums: the encoding (no Flower run) and one real SecAgg+ round
in Flower's simulation runtime, compared with the plain aggregation within SecAgg+'s quantisation bound."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from prelort.methods import ClientUpdate, FederationSpec, build, key
from prelort.privacy import PrivacyError

pytest.importorskip("flwr")

from secagg_simulation import secagg_aggregate_simulation  # noqa: E402

from prelort.secure_sums import (  # noqa: E402
    WEIGHT_UNITS,
    SecAggLayout,
    encode_for_secagg,
    finish_secagg,
    weight_units,
)

MODULES = {"m.q": (6, 5), "m.v": (3, 5)}


def _round(method_name: str, ranks=(1, 2, 4), num_examples=(8, 16, 32), seed: int = 0):
    spec = FederationSpec(modules=dict(MODULES), client_ranks=tuple(ranks), alpha=8.0)
    method = build(method_name, spec)
    g = torch.Generator().manual_seed(seed)
    state = method.init_state(g)
    updates = []
    for client, n in enumerate(num_examples):
        r = method.client_rank(client, state)
        tensors = {}
        for module, (d_out, d_in) in MODULES.items():
            tensors[key(module, "lora_A")] = torch.randn(r, d_in, generator=g) * 0.3
            tensors[key(module, "lora_B")] = torch.randn(d_out, r, generator=g) * 0.3
        updates.append(ClientUpdate(client, r, n, tensors, 1, method_name))
    return method, state, updates


@pytest.mark.parametrize("method_name", ["prelort", "fedit", "zeropad", "hetlora"])
def test_weighted_mean_of_the_uploads_finishes_to_the_plain_aggregate(method_name):
    """What SecAgg+ computes (the rho-weighted mean of the fixed-shape uploads), finished by the method's
    rule, is the method's aggregate - exactly, without quantisation."""
    method, state, updates = _round(method_name, ranks=(2, 2, 2) if method_name == "fedit" else (1, 2, 4))
    if method_name == "hetlora":
        updates[2] = dataclasses.replace(updates[2], meta={"pruned_to": 3})
    layout = SecAggLayout.of(state)
    uploads = [encode_for_secagg(method, u, layout) for u in updates]
    for arrays, _ in uploads:  # every client uploads the same fixed shapes, whatever its rank
        assert [a.shape for a in arrays] == [*layout.shapes, (layout.rank,)]
    total = sum(w for _, w in uploads)
    mean = [sum(w * arrays[i].astype(np.float64) for arrays, w in uploads) / total for i in range(len(uploads[0][0]))]
    new = finish_secagg(method, state, mean, layout, [(u.client, u.meta) for u in updates])
    plain = method.aggregate(state, updates)
    for name, t in plain.tensors.items():
        torch.testing.assert_close(new.tensors[name], t, rtol=0, atol=1e-6)
    assert new.meta == plain.meta  # HetLoRA's pruned rank bookkeeping included


def test_encoding_refuses_values_secagg_would_clip_and_sizes_weights():
    method, state, updates = _round("prelort")
    layout = SecAggLayout.of(state)
    big = dataclasses.replace(updates[0], tensors={k: v * 100 for k, v in updates[0].tensors.items()})
    with pytest.raises(
        PrivacyError,
        match=r"client 0: m\.\w\.lora_\w holds a value of magnitude .* outside "
        r"SecAgg\+'s clipping range \+-8",
    ):
        encode_for_secagg(method, big, layout)
    assert weight_units(16, 64) == WEIGHT_UNITS // 4 and weight_units(0, 64) == 0 and weight_units(1e-9, 64) == 1
    with pytest.raises(PrivacyError, match="weight 65 outside"):
        weight_units(65, 64)
    arrays, w = encode_for_secagg(method, updates[1], layout, uniform_weight=True)
    assert w == 1.0 and list(arrays[-1]) == [1.0, 1.0, 0.0, 0.0]  # rank-2 client's padded weight mask


@pytest.mark.parametrize("method_name", ["flexlora", "flora"])
def test_dense_methods_cannot_be_laid_out(method_name):
    method, state, updates = _round(method_name)
    with pytest.raises(PrivacyError, match=f"method '{method_name}' does not aggregate plain sums"):
        secagg_aggregate_simulation(method, state, updates, max_weight=64)


def test_secaggplus_round_in_flower_simulation_matches_plain_aggregation():
    """One SecAgg+ round (3 SuperNodes, Flower simulation). Weights 8, 16, 32 with W = 64 give rho_k =
    1/8, 1/4, 1/2 exactly, so the only error is SecAgg+'s stochastic quantisation: every recovered entry of
    the sums N', D' is within K * (2 c / Q) / sum rho = 3 * (16 / 2**22) / 0.875 = 1.3e-5 of the exact one,
    and the finished state within that bound propagated through N_i / D_i."""
    method, state, updates = _round("prelort")
    new, info = secagg_aggregate_simulation(method, state, updates, max_weight=64)
    layout = SecAggLayout.of(state)
    rho = [1 / 8, 1 / 4, 1 / 2]
    assert info["clients"] == 3 and info["rho_total"] == pytest.approx(0.875, abs=0)
    eps = info["bound"]
    assert eps == pytest.approx(3 * 16 / 2**22 / 0.875)
    uploads = [encode_for_secagg(method, u, layout)[0] for u in updates]
    exact = [sum(r * up[i].astype(np.float64) for r, up in zip(rho, uploads)) / 0.875 for i in range(len(uploads[0]))]
    for got, want in zip(info["arrays"], exact):
        err = np.abs(np.asarray(got, dtype=np.float64) - want).max()
        assert err <= eps, f"SecAgg+ sum off by {err:.3g} > bound {eps:.3g}"
    # The finished state: |n'/d' - n/d| <= eps (1 + |n/d|) / (d - eps) per entry (d = D'_i > eps here).
    plain = method.aggregate(state, updates)
    den = exact[-1]
    for name, want in plain.tensors.items():
        dim = 0 if name.endswith("lora_A") else 1
        shape = [1, 1]
        shape[dim] = layout.rank
        d = torch.from_numpy(den).view(shape)
        tol = eps * (1 + want.double().abs()) / (d - eps)
        diff = (new.tensors[name].double() - want.double()).abs()
        assert bool((diff <= tol + 1e-7).all()), f"{name}: max diff {float(diff.max()):.3g}"
    # and SecAgg+ did work on the values: the result is not the plain one bit for bit
    assert any(not torch.equal(new.tensors[n], plain.tensors[n]) for n in plain.tensors)


def test_weight_bound_is_the_number_of_examples_or_hetloras_norm_bound():
    from prelort.secure_sums import max_weight_bound

    method, _, _ = _round("prelort")
    assert max_weight_bound(method, 64, None) == 64.0
    assert max_weight_bound(_round("zeropad")[0], 64, 3.0) == 64.0  # data-size weights ignore the norm bound
    het, _, updates = _round("hetlora")
    assert max_weight_bound(het, 64, 3.0) == 4.5
    with pytest.raises(PrivacyError, match="needs validation.max_update_norm"):
        max_weight_bound(het, 64, None)
    # the bound holds: ||B A||_F <= ||update||^2 / 2 for every client
    from prelort.secure_sums import client_weight
    from prelort.updates import update_norm

    for u in updates:
        assert client_weight(het, u) <= update_norm(u.tensors) ** 2 / 2
