"""A newcomer's mistakes (issue 16): one line on stderr with an exit code, nothing left in --out, --debug,
--version, argument help, `prelort check`, `prelort eval` read-only, `export --rank` on a non-tier rank."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.cli_runner import checkout_env, prelort, prelort_here

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
FAST = [
    "rounds=1",
    "train.local_steps=1",
    "data.num_train=32",
    "data.num_test=4",
    "eval.max_examples=2",
    "eval.max_new_tokens=2",
    "eval.truncation_curve=false",
]


def error_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in res.stderr, res.stderr
    return lines[-1]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    res = prelort_here("run", TINY, "--out", str(out), "--quiet", *sets(*FAST))
    assert res.returncode == 0, res.stderr
    return out


MODEL_LIBRARIES = ("torch", "transformers", "peft")


def run_and_list_imports(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``prelort *args`` in a fresh Python; also which of :data:`MODEL_LIBRARIES` it had imported on exit."""
    code = (
        "import sys\nfrom prelort.apps.cli import app\n"
        f"try:\n    app({list(args)!r})\n"
        "except SystemExit as e:\n"
        f"    print(e.code, *(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=checkout_env(),
        timeout=120,
    )
    return res, res.stdout.split()


def test_an_invalid_set_is_one_line_exit_2_and_imports_no_model_library(tmp_path):
    res, printed = run_and_list_imports("run", TINY, "--out", str(tmp_path / "r"), "--set", "train.lr_rate=0.1")
    assert printed == ["2"], res.stdout + res.stderr  # exit 2, none of the model libraries imported
    assert res.stderr.strip().splitlines() == [
        "error: invalid config: train.lr_rate: unknown key; fix the key in the config file or in --set"
    ]
    assert not (tmp_path / "r").exists()


def test_a_refused_out_is_one_line_before_transformers_and_peft_are_imported(tmp_path):
    """--out checks come before the model libraries (~12 s of imports): a refusal takes a second."""
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("my notes\n")
    res, printed = run_and_list_imports("run", TINY, "--out", str(own))
    assert printed[0] == "2" and "transformers" not in printed and "peft" not in printed, res.stdout + res.stderr
    assert "is not empty and is not a prelort run directory" in error_line(res)
    assert [p.name for p in own.iterdir()] == ["notes.txt"]


def test_debug_shows_the_traceback_and_the_same_line(tmp_path):
    res = prelort("--debug", "run", TINY, "--out", str(tmp_path / "r"), "--set", "train.lr_rate=0.1")
    assert res.returncode == 2
    assert "Traceback (most recent call last)" in res.stderr and "ConfigError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: invalid config: train.lr_rate")


def test_a_missing_data_file_is_one_line_and_leaves_no_run_directory(tmp_path):
    out = tmp_path / "r"
    res = prelort_here("run", TINY, "--out", str(out), "--set", "data.source=no/train.jsonl")
    assert res.returncode == 2
    assert error_line(res) == (
        "error: data.source 'no/train.jsonl': no such file or directory; check "
        "data.source (builtin, a hub dataset id, or a local json/jsonl/csv/parquet file "
        "or directory)"
    )
    assert not out.exists()


def test_a_missing_model_path_leaves_no_run_directory(tmp_path):
    out = tmp_path / "r"
    res = prelort_here("run", TINY, "--out", str(out), "--set", f"model.name={tmp_path / 'no-model'}")
    assert res.returncode == 2
    assert re.fullmatch(r"error: model path '.*no-model' does not exist; check the path", error_line(res))
    assert not out.exists()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_a_mistyped_alias_offline_names_the_closest_alias_before_loading_anything(tmp_path, env):
    out = tmp_path / "r"
    res = prelort("run", TINY, "--out", str(out), "--set", "model.name=smollm2-135m", env=env, timeout=60)
    assert res.returncode == 2
    line = error_line(res)
    assert line.startswith(
        "error: model.name 'smollm2-135m' is not an alias, not a local path, and not a hub model in the local cache ("
    )
    assert line.endswith("did you mean 'smollm2-135m-instruct'?")
    assert ("HF_HUB_OFFLINE is set" in line) == ("HF_HUB_OFFLINE" in env)
    assert not out.exists()


def test_the_hub_is_probed_once_per_process(monkeypatch):
    from prelort import model_names

    calls = []
    real = model_names.socket.create_connection

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_names, "_reachable", None)
    monkeypatch.setattr(model_names.socket, "create_connection", counting)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert model_names.hub_reachable() is False and model_names.hub_reachable() is False
    assert len(calls) == 1
    with pytest.raises(model_names.ModelLoadError, match=r"did you mean 'qwen2.5-coder-0.5b-instruct'\?"):
        model_names.check_model_name("qwen2.5-coder-0.5b")
    model_names.check_model_name("tiny-llama")  # aliases and local paths pass without a probe
    model_names.check_model_name(str(ROOT))
    assert len(calls) == 1


def test_version_and_positional_argument_help():
    res = prelort("--version")
    assert res.returncode == 0 and re.fullmatch(r"prelort \d+\.\d+\.\d+\S*\n", res.stdout)
    res = prelort("run", "--help")
    assert res.returncode == 0 and "YAML config file" in res.stdout
    res = prelort("verify-update", "--help")
    assert "NAME.safetensors of a client update" in res.stdout


def test_methods_are_listed_in_the_readmes_order():
    res = prelort("methods")
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    # the README's "## Methods" section only: generated result tables further down also start rows with `name`
    methods = (ROOT / "README.md").read_text().split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    table = re.findall(r"^\| `(\w+)` \|", methods, flags=re.M)
    assert names == table == ["prelort", "fedit", "zeropad", "hetlora", "flexlora", "flora"]


def test_check_accepts_a_run_and_lists_the_problems_of_a_damaged_one(finished_run, tmp_path):
    res = prelort_here("check", str(finished_run))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "follows the run-directory contract" in res.stdout
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.yaml", "run.log", "summary.csv"):
        (damaged / name).write_bytes((finished_run / name).read_bytes())
    lines = (finished_run / "metrics.jsonl").read_text().splitlines()
    (damaged / "metrics.jsonl").write_text(
        "\n".join(
            lines
            + [lines[-1], '{"round": 1, "rank": 2, "kind": "tier", "accuracy": 2.0, "rougeL": 0, "perplexity": 1.5}']
        )
    )
    res = prelort_here("check", str(damaged))
    assert res.returncode == 2
    problems = res.stdout.splitlines()
    assert "no plots/*.png" in problems
    assert "no checkpoints/round-0 (the initial global adapter)" in problems
    assert "no adapters/rank-T" in problems
    assert any(re.fullmatch(rf"metrics.jsonl line {len(lines) + 1} repeats line {len(lines)} .*", p) for p in problems)
    assert f"metrics.jsonl line {len(lines) + 2}: accuracy=2.0 not in [0, 1]" in problems
    assert res.stderr.strip().endswith("does not follow the run-directory contract")


def test_eval_writes_nothing_into_the_run_folder(finished_run, tmp_path):
    half = tmp_path / "only-config"
    half.mkdir()
    (half / "config.yaml").write_bytes((finished_run / "config.yaml").read_bytes())
    res = prelort_here("eval", str(half))
    assert res.returncode == 2
    assert error_line(res).startswith(f"error: {half} has no checkpoints/round-N yet: nothing to evaluate")
    assert sorted(p.name for p in half.iterdir()) == ["config.yaml"]

    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    res = prelort_here("eval", str(finished_run), "--rank", "2")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["rank"] == 2
    after = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert after == before


def test_export_records_the_hub_id_and_says_when_it_truncates(finished_run, tmp_path):
    res = prelort_here("export", str(finished_run), "--rank", "3", "--out", str(tmp_path / "r3"))
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == (
        "note: rank 3 is not a client rank tier (1, 2, 4, 8): exporting the global adapter "
        "truncated to its first 3 dimensions"
    )
    assert json.loads((tmp_path / "r3" / "adapter_config.json").read_text())["r"] == 3
    res = prelort_here("export", str(finished_run), "--rank", "4", "--out", str(tmp_path / "r4"))
    assert res.returncode == 0 and res.stderr == ""
    # tiny-llama is random, not a hub model: its exports keep the alias
    assert json.loads((tmp_path / "r4" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"


def test_aliases_export_their_hub_ids():
    from prelort.model_names import hub_id

    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("qwen2.5-coder-0.5b-instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert hub_id("org/model") == "org/model"


def test_load_base_model_loads_what_an_export_needs(finished_run, tmp_path):
    import torch
    from peft import PeftModel

    import prelort as prelort_pkg

    res = prelort_here("export", str(finished_run), "--rank", "2", "--out", str(tmp_path / "r2"))
    assert res.returncode == 0, res.stderr
    base, tokenizer = prelort_pkg.load_base_model("tiny-llama")
    model = PeftModel.from_pretrained(base, str(tmp_path / "r2"))
    ids = tokenizer("1 + 1 =", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_failures_while_working_exit_1_bad_input_exits_2_with_what_to_do():
    import errno

    from prelort.apps.cli import EXIT_FAILED, EXIT_USAGE, _classify
    from prelort.apps.launch import FlowerRunError
    from prelort.checkpoint import CheckpointError
    from prelort.data import DataError
    from prelort.federation import RoundFailed

    failed = RoundFailed(
        "round 2: 0 accepted update(s)", round_=2, accepted=0, min_per_round=1, attempts=1, completed=1
    )
    assert _classify(failed) == (EXIT_FAILED, "")
    assert _classify(FlowerRunError("Flower run 7 ended with status 'failed'")) == (
        EXIT_FAILED,
        "see docs/deployment.md",
    )
    assert _classify(OSError(errno.ENOSPC, "No space left on device")) == (
        EXIT_FAILED,
        "free disk space (or choose another --out), then continue with --resume",
    )
    assert _classify(DataError("x"))[0] == EXIT_USAGE
    assert _classify(CheckpointError("checkpoint file state.json is missing"))[1].startswith(
        "the run directory's checkpoints are damaged"
    )
    assert _classify(FileExistsError("runs/x already holds a run"))[0] == EXIT_USAGE
    code, todo = _classify(TypeError("boom"))
    assert code == EXIT_FAILED and "prelort --debug" in todo


# issue 26: a config path that is no regular file says what it is; a key given twice is refused (item 8)
CONFIG_FILE_TODO = "give the path of a YAML (or TOML) config file"


@pytest.mark.parametrize(
    "kind, stdin, problem",
    [
        ("missing", None, "does not exist"),
        ("directory", None, "is a directory, not a config file"),
        ("fifo", None, "is a FIFO, not a config file"),
        ("/dev/null", None, "is a device, not a config file"),
        ("/dev/stdin", subprocess.PIPE, "is a FIFO, not a config file"),  # `... | prelort run /dev/stdin`
        ("/dev/stdin", subprocess.DEVNULL, "is a device, not a config file"),
    ],
)
def test_a_config_that_is_no_regular_file_says_what_it_is(tmp_path, kind, stdin, problem):
    config = {"missing": tmp_path / "nope.yaml", "directory": tmp_path, "fifo": tmp_path / "c.yaml"}.get(kind, kind)
    if kind == "fifo":
        os.mkfifo(config)  # never opened: nothing writes to it, so opening it would block
    out = tmp_path / "run"
    res = prelort("run", str(config), "--out", str(out), stdin=stdin, timeout=60)
    assert res.returncode == 2, res.stderr
    assert error_line(res) == f"error: config file {config} {problem}; {CONFIG_FILE_TODO}"
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_config_key_given_twice_is_one_line_exit_2(tmp_path):
    tiny = Path(TINY).read_text()
    config = tmp_path / "c.yaml"
    config.write_text(tiny + "\ntrain:\n  lr: 0.1\n")  # a second train section after a blank line
    first, second = 1 + tiny.splitlines().index("train:"), tiny.count("\n") + 2
    res = prelort("run", str(config), "--out", str(tmp_path / "run"), timeout=60)
    assert res.returncode == 2, res.stderr
    assert error_line(res) == (
        f"error: {config}: train is given twice (lines {first} and {second}); a key may appear only once; "
        "fix the key in the config file or in --set"
    )
    assert not (tmp_path / "run").exists()
