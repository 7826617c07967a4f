"""Zero-padding FedAvg: padded dimensions count as zeros (the dilution)."""

from __future__ import annotations

import torch

from prelort.methods import key
from prelort.methods.zeropad import ZeroPadding


def test_dimension_covered_by_one_of_four_equal_clients_gets_a_quarter(make_spec, make_update):
    spec = make_spec(ranks=(1, 1, 1, 4))
    method = ZeroPadding(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    ups = [make_update(spec, k, r, num_examples=7) for k, r in enumerate((1, 1, 1, 4))]
    new = method.aggregate(state, ups)
    for module in spec.modules:
        ka, kb = key(module, "lora_A"), key(module, "lora_B")
        big = ups[3]
        torch.testing.assert_close(new.tensors[ka][1:], big.tensors[ka][1:] / 4)
        torch.testing.assert_close(new.tensors[kb][:, 1:], big.tensors[kb][:, 1:] / 4)
        torch.testing.assert_close(new.tensors[ka][0], sum(u.tensors[ka][0] for u in ups) / 4)


def test_weights_are_normalised_data_sizes_and_uncovered_dims_become_zero(make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4))
    method = ZeroPadding(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    ups = [make_update(spec, 0, 1, num_examples=1), make_update(spec, 1, 2, num_examples=3)]
    new = method.aggregate(state, ups)
    for module, (_d_out, d_in) in spec.modules.items():
        ka = key(module, "lora_A")
        padded = [torch.cat([u.tensors[ka], torch.zeros(4 - u.rank, d_in)]) for u in ups]
        torch.testing.assert_close(new.tensors[ka], (1 * padded[0] + 3 * padded[1]) / 4)
        assert not new.tensors[ka][2:].any()  # the rank-4 client was not in this round: zeros, not previous
    assert method.plan(4).truncations == (4,) and method.plan(4).mode == "off"
