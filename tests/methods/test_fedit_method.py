"""FedIT: everyone at the smallest rank, FedAvg of A and B separately."""

from __future__ import annotations

import pytest
import torch

from prelort.methods import key, lora_init
from prelort.methods.fedit import FedIT


def test_every_client_trains_at_min_rank(make_spec):
    spec = make_spec(ranks=(4, 2, 8, 2))
    method = FedIT(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    assert [method.client_rank(k, state) for k in range(4)] == [2, 2, 2, 2]
    plan = method.plan(method.client_rank(2, state))
    assert (plan.rank, plan.truncations, plan.mode, plan.extra) == (2, (2,), "off", {})
    # the global adapter is rank r_min, PEFT default init
    for name, t in lora_init(spec, 2, torch.Generator().manual_seed(0)).items():
        assert torch.equal(state.tensors[name], t)
    # a rank-8 tier gets the rank-2 adapter; a rank-1 tier its first dimension
    for module in spec.modules:
        assert method.tier(state, 8).adapter[key(module, "lora_A")].shape[0] == 2
        torch.testing.assert_close(
            method.tier(state, 1).adapter[key(module, "lora_A")], state.tensors[key(module, "lora_A")][:1]
        )


def test_aggregate_is_fedavg_of_each_factor(make_spec, make_update):
    spec = make_spec(ranks=(4, 2, 8, 2))
    method = FedIT(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    ups = [make_update(spec, k, 2, num_examples=n) for k, n in enumerate((3, 1, 6))]
    new = method.aggregate(state, ups)
    for name in new.tensors:
        expected = sum(u.num_examples * u.tensors[name].double() for u in ups) / 10
        torch.testing.assert_close(new.tensors[name], expected.float(), rtol=1e-6, atol=1e-6)
    # A and B separately: the product of the means, not the mean of the products
    m = "layers.0.q_proj"
    prod_mean = sum(u.num_examples * (u.tensors[key(m, "lora_B")] @ u.tensors[key(m, "lora_A")]) for u in ups) / 10
    assert not torch.allclose(new.tensors[key(m, "lora_B")] @ new.tensors[key(m, "lora_A")], prod_mean)


def test_update_at_another_rank_is_rejected(make_spec, make_update):
    spec = make_spec(ranks=(4, 2))
    method = FedIT(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="client 0: FedIT trains rank 2, update has rank 4"):
        method.aggregate(state, [make_update(spec, 0, 4)])


def test_zero_weight_round_keeps_state(make_spec, make_update):
    spec = make_spec(ranks=(2, 2))
    method = FedIT(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    new = method.aggregate(state, [make_update(spec, 0, 2, num_examples=0)])
    for name in state.tensors:
        assert torch.equal(new.tensors[name], state.tensors[name])
