"""Adding a method is one file: tests/methods/trimmed_mean.py, registered from the test suite, gets its config
section, its options, the privacy and secure-aggregation answers and a whole in-process run on the tiny model,
with no edit anywhere in prelort."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prelort import methods
from prelort.check import check_run_dir
from prelort.checkpoint import load_checkpoint
from prelort.config import ConfigError, load
from prelort.federation import check_privacy
from prelort.methods import ClientUpdate, FederationSpec, key
from prelort.privacy import PrivacyError
from prelort.runner import run
from prelort.secure_sums import SecAggLayout, encode_for_secagg, finish_secagg
from prelort.updates import load_update

HERE = Path(__file__).resolve().parent
TINY = HERE.parents[1] / "examples" / "tiny.yaml"
FAST = [
    "train.local_steps=1",
    "train.batch_size=2",
    "data.max_length=32",
    "data.num_test=4",
    "data.num_train=64",
    "eval.max_examples=2",
    "eval.max_new_tokens=1",
    "eval.truncation_curve=false",
    "eval.base=false",
]


@pytest.fixture
def trimmed(load_plugin):
    """The extra method, registered while the test runs (loading its file registers it), then removed again."""
    module = load_plugin(HERE / "trimmed_mean.py")
    yield module.TrimmedMean
    methods.unregister("trimmed")


def test_an_unregistered_method_and_its_section_are_refused_with_the_registered_names():
    with pytest.raises(
        ConfigError,
        match="method: Value error, unknown method 'trimmed'; registered methods: "
        "fedit, flexlora, flora, hetlora, prelort, zeropad",
    ):
        load(TINY, ["method=trimmed"])
    with pytest.raises(ConfigError, match="trimmed: unknown key"):
        load(TINY, ["trimmed.trim=1"])


def test_its_options_come_from_its_own_model_and_privacy_asks_its_flag(trimmed):
    cfg = load(TINY, ["method=trimmed", "trimmed.trim=2"])
    assert cfg.trimmed.trim == 2 and cfg.to_dict()["trimmed"] == {"trim": 2}
    assert load(TINY, ["method=trimmed"]).trimmed.trim == 1  # its model's default
    options = cfg.federation_spec({}).options
    assert options["trimmed_trim"] == 2 and options["nested"] == "all"  # the built-in methods' options stay
    with pytest.raises(ConfigError, match="trimmed.trim: Input should be greater than or equal to 0"):
        load(TINY, ["method=trimmed", "trimmed.trim=-1"])
    # no sum rule: client-level DP and secure aggregation refuse it through the same flag
    assert trimmed.sum_rule is None and trimmed.sum_aggregatable is False
    with pytest.raises(PrivacyError, match="privacy.dp: method 'trimmed' does not aggregate plain sums"):
        check_privacy(load(TINY, ["method=trimmed", "privacy.dp=true"]))
    with pytest.raises(ConfigError, match="method 'trimmed' cannot run under secure aggregation"):
        check_privacy(load(TINY, ["method=trimmed", "engine=flower-sim", "privacy.secure_aggregation=true"]))


def _trimmed_oracle(values: torch.Tensor) -> torch.Tensor:
    """trim = 1: drop each coordinate's largest and smallest value when at least 3 clients cover it."""
    n = values.shape[0]
    if n < 3:
        return values.mean(dim=0)
    return (values.sum(dim=0) - values.max(dim=0).values - values.min(dim=0).values) / (n - 2)


def test_it_runs_end_to_end_and_its_rule_makes_the_global_state(trimmed, tmp_path):
    cfg = load(TINY, [*FAST, "method=trimmed", "trimmed.trim=1", "audit=true", "rounds=2"])
    out = run(cfg, tmp_path / "run", verbose=False)
    assert check_run_dir(out) == []
    trimmed_differs = False
    for round_ in (1, 2):
        _, before, _ = load_checkpoint(out, round_ - 1)
        _, after, info = load_checkpoint(out, round_)
        assert info["method"] == "trimmed" and info["options"]["trimmed_trim"] == 1
        updates = [load_update(p) for p in sorted((out / "updates" / f"round-{round_}").glob("*.safetensors"))]
        assert sorted(u.rank for u in updates) == [1, 2, 4, 8]
        for name, previous in before.tensors.items():
            dim = 0 if name.endswith(".lora_A") else 1
            assert after.tensors[name].shape == previous.shape
            for i in range(previous.shape[dim]):
                values = torch.stack([u.tensors[name].select(dim, i).double() for u in updates if u.rank > i])
                want = _trimmed_oracle(values)
                torch.testing.assert_close(after.tensors[name].select(dim, i).double(), want, rtol=1e-5, atol=1e-7)
                if values.shape[0] >= 3 and not torch.allclose(want, values.mean(dim=0)):
                    trimmed_differs = True
    assert trimmed_differs, "the trimmed mean never differed from the plain mean: the test shows nothing"


def test_a_new_method_with_a_sum_rule_is_accepted_by_the_config_check_and_finished_by_secagg(trimmed):
    """The config check and the SecAgg+ finish ask one flag: a method that is no subclass of a built-in but
    declares a sum rule passes the check and its round finishes from the sums (here: the trimmed mean with
    trim 0 is the unweighted segment-wise mean, so the segment rule on uniform weights must give it)."""
    segment_mean = methods.register(
        type(
            "SegmentMean",
            (trimmed,),
            {
                "name": "segmean",
                "summary": "Unweighted segment-wise mean (a test-suite method).",
                "sum_rule": "segment",
                "options_prefix": "segmean_",
            },
        )
    )
    try:
        assert segment_mean.sum_aggregatable
        check_privacy(
            load(TINY, ["method=segmean", "segmean.trim=0", "engine=flower-sim", "privacy.secure_aggregation=true"])
        )
        spec = FederationSpec(
            modules={"m.q": (5, 4), "m.v": (3, 4)}, client_ranks=(1, 2, 4), alpha=4.0, options={"segmean_trim": 0}
        )
        method = segment_mean(spec)
        g = torch.Generator().manual_seed(0)
        state = method.init_state(g)
        updates = [
            ClientUpdate(
                client=k,
                rank=r,
                num_examples=10,
                tensors={
                    key(m, kind): 0.1 * torch.randn(*((r, d_in) if kind == "lora_A" else (d_out, r)), generator=g)
                    for m, (d_out, d_in) in spec.modules.items()
                    for kind in ("lora_A", "lora_B")
                },
            )
            for k, r in enumerate(spec.client_ranks)
        ]
        layout = SecAggLayout.of(state)
        uploads = [encode_for_secagg(method, u, layout, uniform_weight=True)[0] for u in updates]
        mean = [sum(arrays[i] for arrays in uploads) / len(uploads) for i in range(len(uploads[0]))]
        secure = finish_secagg(method, state, mean, layout)
        plain = method.aggregate(state, updates)
        for name in state.tensors:
            torch.testing.assert_close(secure.tensors[name], plain.tensors[name], rtol=1e-5, atol=1e-6)
    finally:
        methods.unregister("segmean")
