"""FlexLoRA: dense weighted mean of the clients' products, redistributed by truncated SVD."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prelort.methods import ClientUpdate, FederationSpec, key, lora_init
from prelort.methods.flexlora import FlexLoRA


def _weighted_mean_of_products(spec, ups, module):
    s = spec.scale
    total = sum(u.num_examples for u in ups)
    return sum(
        (u.num_examples / total)
        * s
        * (u.tensors[key(module, "lora_B")].double() @ u.tensors[key(module, "lora_A")].double())
        for u in ups
    )


def test_round0_broadcast_is_peft_default_init(make_spec):
    spec = make_spec(ranks=(1, 2, 4))
    method = FlexLoRA(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    assert all(not t.any() for t in state.tensors.values())
    bc = method.broadcast(state, 2, generator=torch.Generator().manual_seed(9))
    expected = lora_init(spec, 2, torch.Generator().manual_seed(9))
    assert bc.adapter.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(bc.adapter[name], t)
    assert any(t.abs().sum() > 0 for n, t in bc.adapter.items() if n.endswith("lora_A"))


def test_aggregate_is_weighted_mean_of_scaled_products(make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4), alpha=3.0)  # s = 0.75: a forgotten scale shows
    method = FlexLoRA(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    ups = [make_update(spec, k, r, num_examples=n) for k, (r, n) in enumerate(((1, 2), (2, 5), (4, 3)))]
    new = method.aggregate(state, ups)
    for module in spec.modules:
        torch.testing.assert_close(
            new.tensors[key(module, "delta")], _weighted_mean_of_products(spec, ups, module).float()
        )
    # the base weights never change: the next round's mean replaces (does not add to) the state
    again = method.aggregate(new, ups)
    for name in new.tensors:
        torch.testing.assert_close(again.tensors[name], new.tensors[name])


@settings(max_examples=20, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    sizes=st.lists(st.integers(1, 9), min_size=4, max_size=4),
    t=st.integers(1, 6),
    alpha=st.sampled_from([1.0, 3.0, 16.0]),
    seed=st.integers(0, 1000),
)
def test_broadcast_is_best_rank_r_approximation(ranks, sizes, t, alpha, seed):
    spec = FederationSpec(modules={"m.q": (5, 4), "m.o": (3, 6)}, client_ranks=tuple(ranks) + (6,), alpha=alpha)
    method = FlexLoRA(spec)
    state = method.init_state(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    ups = []
    for k, r in enumerate(ranks):
        tensors = {}
        for module, (d_out, d_in) in spec.modules.items():
            tensors[key(module, "lora_A")] = torch.randn(r, d_in, generator=g)
            tensors[key(module, "lora_B")] = torch.randn(d_out, r, generator=g)
        ups.append(ClientUpdate(client=k, rank=r, num_examples=sizes[k], tensors=tensors))
    new = method.aggregate(state, ups)
    bc = method.broadcast(new, t)
    s = spec.scale
    for module, (d_out, d_in) in spec.modules.items():
        W = new.tensors[key(module, "delta")].double()
        torch.testing.assert_close(W, _weighted_mean_of_products(spec, ups, module), rtol=1e-5, atol=1e-5)
        A = bc.adapter[key(module, "lora_A")].double()
        B = bc.adapter[key(module, "lora_B")].double()
        assert A.shape == (t, d_in) and B.shape == (d_out, t)
        approx = s * B @ A
        sv = torch.linalg.svdvals(W)
        k = min(t, sv.numel())
        # Eckart-Young: the error is exactly the dropped singular values
        err = torch.linalg.matrix_norm(W - approx) ** 2
        torch.testing.assert_close(err, (sv[k:] ** 2).sum(), rtol=1e-4, atol=1e-5)
        # and it is torch's own rank-t SVD truncation
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(approx, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], rtol=1e-4, atol=1e-5)
        # all of S sits in B: A has orthonormal rows (beyond min(d_out, d_in), zero rows)
        torch.testing.assert_close(A[:k] @ A[:k].T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-5)
        assert not A[k:].any() and not B[:, k:].any()
        torch.testing.assert_close(B[:, :k].norm(dim=0), S[:k] / s, rtol=1e-4, atol=1e-5)


def test_svd_cache_follows_state_changes(make_spec, make_update):
    spec = make_spec(ranks=(2, 4))
    method = FlexLoRA(spec)
    s = spec.scale
    st1 = method.aggregate(method.init_state(torch.Generator().manual_seed(0)), [make_update(spec, 0, 2, seed=1)])
    st2 = method.aggregate(st1, [make_update(spec, 1, 4, seed=2)])
    m = "layers.0.q_proj"

    def rank2(state):
        bc = method.broadcast(state, 2)
        return s * bc.adapter[key(m, "lora_B")] @ bc.adapter[key(m, "lora_A")]

    def truth(state):
        U, S, Vh = torch.linalg.svd(state.tensors[key(m, "delta")].double(), full_matrices=False)
        return (U[:, :2] * S[:2] @ Vh[:2]).float()

    for state in (st1, st2, st1):
        torch.testing.assert_close(rank2(state), truth(state), rtol=1e-5, atol=1e-5)
    st2.tensors[key(m, "delta")].mul_(-3.0)  # in place: the cached SVD must not be reused
    torch.testing.assert_close(rank2(st2), truth(st2), rtol=1e-5, atol=1e-5)


def test_tier_is_the_rank_t_truncation(make_spec, make_update):
    spec = make_spec(ranks=(1, 4))
    method = FlexLoRA(spec)
    state = method.aggregate(method.init_state(torch.Generator().manual_seed(0)), [make_update(spec, 1, 4)])
    for t in range(1, 5):
        tier = method.tier(state, t).adapter
        bc = method.broadcast(state, t, generator=torch.Generator().manual_seed(123))
        for name in tier:
            assert torch.equal(tier[name], bc.adapter[name])  # deterministic, no random part once trained
