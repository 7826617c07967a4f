"""The method authors' toolkit and the sum-rule template: a sum-rule method declares its rule and inherits its
round; a plain round, DP and SecAgg+ finish through the one mean; methods/ has no import circle; the extra
method of tests/methods/trimmed_mean.py uses only the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import prelort.methods as methods_pkg
from prelort import factor_sums
from prelort.config import PrivacyConfig
from prelort.methods import available, get
from prelort.methods.toolkit import SumRuleMethod, empty_factor_sums, lora_shapes
from prelort.privacy import dp_aggregate

METHODS_DIR = Path(methods_pkg.__file__).resolve().parent
TRIMMED = Path(__file__).resolve().parent / "trimmed_mean.py"


@pytest.mark.parametrize("name", sorted(n for n, c in available().items() if c.sum_rule is not None))
def test_a_sum_rule_method_inherits_its_aggregate_from_the_template(name):
    cls = get(name)
    assert issubclass(cls, SumRuleMethod) and cls.aggregate is SumRuleMethod.aggregate


def test_the_template_needs_a_sum_rule(make_spec):
    lacking = type(
        "Lacking",
        (SumRuleMethod,),
        {"name": "lacking", "summary": "-", "init_state": None, "broadcast": None, "plan": None},
    )
    with pytest.raises(TypeError, match="declares its sum_rule"):
        lacking(make_spec())


@pytest.mark.parametrize("name", ["prelort", "zeropad", "hetlora"])
def test_plain_round_is_finish_sums_of_the_sums_bit_for_bit(name, make_spec, make_update):
    # float weights (HetLoRA's norms) and a round without the top rank (a compact numerator) included
    spec = make_spec(ranks=(1, 2, 4, 8))
    method = get(name)(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    updates = [make_update(spec, k, r, num_examples=3 + 5 * k) for k, r in enumerate((1, 2, 4, 2, 1))]
    plain = method.aggregate(state, updates)
    sums = empty_factor_sums(lora_shapes(state))
    for u in updates:
        factors = method.contributed_factors(u)
        sums.add(
            {f"{m}.{kind}": x for m, a, b in factors for kind, x in (("lora_A", a), ("lora_B", b))},
            method.client_weight(u, factors),
        )
    full = method.finish_sums(state, {n: s.num for n, s in sums.items()}, {n: s.den for n, s in sums.items()})
    for tensor in state.tensors:
        assert torch.equal(plain.tensors[tensor], full[tensor]), tensor


@pytest.mark.parametrize("name", ["prelort", "fedit", "zeropad"])
def test_dp_without_noise_or_clipping_is_the_plain_round_with_unit_weights(name, make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4, 4))
    method = get(name)(spec)
    state = method.init_state(torch.Generator().manual_seed(1))
    ranks = [method.client_rank(k, state) for k in range(4)]
    updates = [make_update(spec, k, r, num_examples=1) for k, r in enumerate(ranks)]
    refs = {u.client: {n: torch.zeros_like(t) for n, t in u.tensors.items()} for u in updates}
    dp, info = dp_aggregate(
        method,
        state,
        updates,
        refs,
        PrivacyConfig(dp=True, clip_norm=1e6, noise_multiplier=0.0),
        torch.Generator().manual_seed(0),
    )
    plain = method.aggregate(state, updates)
    assert info["clients_clipped"] == 0
    for tensor in state.tensors:
        assert torch.equal(dp.tensors[tensor], plain.tensors[tensor]), tensor


def test_dp_keeps_the_methods_bookkeeping(make_spec, make_update):
    spec = make_spec(ranks=(2, 4, 4))
    method = get("hetlora")(spec)
    state = method.init_state(torch.Generator().manual_seed(2))
    updates = [make_update(spec, 0, 2), make_update(spec, 1, 4, meta={"pruned_to": 3}), make_update(spec, 2, 4)]
    refs = {u.client: {n: torch.zeros_like(t) for n, t in u.tensors.items()} for u in updates}
    dp, _ = dp_aggregate(
        method,
        state,
        updates,
        refs,
        PrivacyConfig(dp=True, clip_norm=1.0, noise_multiplier=0.5),
        torch.Generator().manual_seed(0),
    )
    assert dp.meta["client_ranks"] == {"0": 2, "1": 3, "2": 4}
    assert state.meta["client_ranks"] == {"0": 2, "1": 4, "2": 4}  # the caller's state is untouched


def test_a_compact_numerator_finishes_like_the_full_one():
    num = torch.arange(12, dtype=torch.float64).reshape(2, 6) + 1.0
    full = torch.cat([num, torch.zeros(3, 6, dtype=torch.float64)])
    den = torch.tensor([4.0, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    previous = torch.full((5, 6), -1.0)
    for rule in ("segment", "padded"):
        assert torch.equal(
            factor_sums.mean_from_sums(num, den, previous, 0, rule),
            factor_sums.mean_from_sums(full, den, previous, 0, rule),
        ), rule
    with pytest.raises(ValueError, match="unknown sum rule 'median'"):
        factor_sums.mean_from_sums(num, den, previous, 0, "median")
    with pytest.raises(ValueError, match="sums have"):
        factor_sums.mean_from_sums(torch.zeros(6, 6, dtype=torch.float64), den, previous, 0)


def _prelort_imports(path: Path) -> set[str]:
    """The prelort modules a file imports (a relative import resolved as from a module of prelort.methods)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            package = ".".join(["prelort", "methods"][: 3 - node.level])
            found |= {f"{package}.{node.module}"} if node.module else {f"{package}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prelort"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("prelort")}
    return found


def test_the_interface_imports_no_other_module_of_methods():
    """base.py (the interface) sits below the toolkit and the methods: no circle inside methods/."""
    imported = _prelort_imports(METHODS_DIR / "base.py")
    assert not {m for m in imported if m.startswith("prelort.methods")}, imported
    toolkit = _prelort_imports(METHODS_DIR / "toolkit.py")
    assert {m for m in toolkit if m.startswith("prelort.methods")} == {"prelort.methods.base"}


def test_the_extra_method_uses_only_public_names():
    imported = _prelort_imports(TRIMMED)
    assert imported == {"prelort.methods", "prelort.methods.toolkit"}, imported
    assert not any(part.startswith("_") for m in imported for part in m.split("."))
    names = {
        a.name
        for node in ast.walk(ast.parse(TRIMMED.read_text()))
        if isinstance(node, ast.ImportFrom)
        for a in node.names
    }
    assert not {n for n in names if n.startswith("_")}
