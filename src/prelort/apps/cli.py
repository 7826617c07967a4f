"""The ``prelort`` command (docs/design.md section 8).

Every expected failure ends with one line on stderr, ``error: <what failed, and why>[; <what to do>]``, and
an exit code (docs/cli.md): 0 success, 1 the run (or command) failed while working (a round without enough
updates, Flower, the disk), 2 bad input (config, --set, data, model, paths, run directory), 130
interrupted (Ctrl-C). ``prelort --debug COMMAND`` (or PRELORT_DEBUG=1) also prints the traceback.
Heavy libraries (torch, transformers, peft) are imported only after the config is valid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # a traceback is for --debug, and never with rich's locals (a model's tensors rendered for minutes)
    pretty_exceptions_enable=False,
    help="Federated LoRA fine-tuning with heterogeneous client ranks (PreLort and baselines).",
)

_options = {"debug": bool(os.environ.get("PRELORT_DEBUG"))}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prelort")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"prelort {_version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print prelort's version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="On an error, also print the Python traceback (PRELORT_DEBUG=1 does the same)."
    ),
) -> None:
    """Federated LoRA fine-tuning with heterogeneous client ranks (PreLort and baselines).

    Exit codes: 0 success, 1 the run failed while working (round, Flower, disk), 2 bad input (config, data, model, paths), 130 interrupted (Ctrl-C). docs/cli.md has the details.
    """
    if debug:
        _options["debug"] = True


# Exceptions by class name (their modules import torch or flwr; a config error must not wait for them):
# exit code and what to do.
_INPUT_ERRORS = {
    "ConfigFileError": "give the path of a YAML (or TOML) config file",  # a ConfigError: listed before it
    "ConfigError": "fix the key in the config file or in --set",
    "DataError": "check data.source (builtin, a hub dataset id, or a local json/jsonl/csv/parquet file or directory)",
    "ModelLoadError": "",
    "HarnessError": "",
    "PrivacyError": "see docs/privacy.md",
    "CheckpointError": "the run directory's checkpoints are damaged or missing; resume from an intact copy or start "
    "a new --out",
    "UpdateRejected": "",
    "ExportError": "",
    "ProbeError": "",
}
_RUN_ERRORS = {
    "RoundFailed": "",
    "FlowerRunError": "see docs/deployment.md",
}


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _classify(e: BaseException) -> tuple[int, str]:
    """(exit code, what to do) for an exception a command did not handle itself."""
    name = type(e).__name__
    for cls in type(e).__mro__:
        if cls.__name__ in _INPUT_ERRORS:
            return EXIT_USAGE, _INPUT_ERRORS[cls.__name__]
        if cls.__name__ in _RUN_ERRORS:
            return EXIT_FAILED, _RUN_ERRORS[cls.__name__]
    if isinstance(e, FileExistsError):
        return EXIT_USAGE, ""
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE, "check the path"
    if isinstance(e, PermissionError):
        return EXIT_USAGE, "check the permissions, or choose another --out"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return EXIT_FAILED, "free disk space (or choose another --out), then continue with --resume"
    if isinstance(e, ImportError):
        return EXIT_USAGE, "install the missing package (see README's set-up)"
    if isinstance(e, OSError):
        return EXIT_FAILED, ""
    return EXIT_FAILED, f"unexpected {name}: rerun with prelort --debug ... for the traceback and report it"


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _expected_failures(what: str) -> Iterator[None]:
    """Turn an exception into one line on stderr (``error: <what failed and why>; <what to do>``) and an exit
    code. The messages name what failed themselves (the dotted config key, the path, the round); ``what`` (the
    stage: config, model, run, ...) is only said for an interruption."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        if _options["debug"]:
            traceback.print_exc()
        _fail(f"{what}: interrupted", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - every failure ends in one line; --debug shows the traceback
        if _options["debug"]:
            traceback.print_exc()
        code, todo = _classify(e)
        message = str(e) or type(e).__name__
        _fail(message + (f"; {todo}" if todo else ""), code)


@app.command("methods")
def methods_cmd() -> None:
    """List the federated methods with a one-line description each (in the README's order)."""
    from .. import methods

    for name, cls in methods.available().items():  # the registry's listing order, the README's
        typer.echo(f"{name:10s} {cls.summary}")


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="YAML config file (see examples/)."),
    out: Path = typer.Option(..., "--out", help="Run directory to create (or resume)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a key: --set train.lr=1e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete round in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-round lines on the console."),
) -> None:
    """Run a federated fine-tuning and write its run directory.

    Nothing is written to --out before the config, the data and the model have loaded. Ctrl-C stops after the round under way (a second Ctrl-C at once); --resume then continues, redoing whatever the last complete round's records lack. --resume on a finished run says so and does nothing.
    """
    from .. import config as config_mod  # light: pydantic + yaml; the model libraries come after validation

    with _expected_failures("config"):
        cfg = config_mod.load(config, set_ or [])
    with _expected_failures("model"):
        from ..model_names import check_model_name  # a mistyped alias fails here, before torch is imported

        check_model_name(cfg.model.name, cfg.model.gguf_file)
    resume_cmd = shlex.join(
        ["prelort", "run", str(config), "--out", str(out), *[a for s in (set_ or []) for a in ("--set", s)], "--resume"]
    )
    with _expected_failures("run"):
        from ..rundir import RunDir, check_out

        # read-only checks of --out (and of what --resume may change) before the model libraries are imported
        # (~12 s) and the model loads: a refusal takes a second
        check_out(out, resume)
        if resume:
            RunDir(out).check_resume_config(cfg)
        if resume and RunDir(out).is_complete(cfg):
            typer.echo(f"{out} is a finished run ({cfg.rounds} rounds, every record written): nothing to do")
            return
        from ..runner import RunInterrupted, run

        try:
            run(cfg, out, resume=resume, verbose=not quiet)
        except RunInterrupted as e:
            _fail(f"interrupted after round {e.completed}; resume with: {resume_cmd}", EXIT_INTERRUPTED)
        except KeyboardInterrupt:  # outside the round loop (model loading, Flower)
            _fail(
                f"interrupted; resume with: {resume_cmd}"
                if RunDir(out).checkpoints_dir.is_dir()
                else "interrupted before the first checkpoint; start again",
                EXIT_INTERRUPTED,
            )
    typer.echo(f"run directory: {out}")


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    ranks: list[int] | None = typer.Option(
        None, "--rank", help="Evaluate this rank tier (repeat for several; default: every client rank)."
    ),
    lm_eval: str | None = typer.Option(
        None,
        "--lm-eval",
        help="Comma-separated lm-evaluation-harness tasks: score the base model and each tier with them (writes "
        "eval/lm-eval-rank-T.json and eval/lm-eval-base.json).",
    ),
    include_path: Path | None = typer.Option(
        None, "--include-path", help="With --lm-eval: a folder of extra task YAMLs (e.g. examples/lm-eval)."
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="With --lm-eval: score at most N documents per task."
    ),
) -> None:
    """Evaluate the run's latest global model per rank tier.

    Without --lm-eval: prelort's own metrics, printed as JSON lines (nothing in RUN_DIR is written). With --lm-eval TASKS: lm-evaluation-harness (pip install 'prelort[lm-eval]') scores the base model and the global adapter at each tier, prints lm-eval's table per tier and writes eval/lm-eval-base.json and eval/lm-eval-rank-T.json (nothing else of the run changes).
    """
    import json

    with _expected_failures("eval"):
        if lm_eval is None and (include_path is not None or limit is not None):
            _fail("--include-path and --limit go with --lm-eval TASKS")
        tasks = [t.strip() for t in (lm_eval or "").split(",") if t.strip()]
        if lm_eval is not None and not tasks:
            _fail("--lm-eval: give one or more task names, comma-separated")
        manager = None
        if tasks:  # unknown tasks fail before the model loads
            from ..lm_harness import task_manager

            manager = task_manager(tasks, include_path)
        from ..runner import Session

        session = Session.open(run_dir)
        fed = session.federation
        tiers = list(dict.fromkeys(ranks)) if ranks else fed.tiers()
        for t in tiers:
            if not 1 <= t <= fed.spec.max_rank:
                _fail(f"--rank {t} outside 1..{fed.spec.max_rank}")
        if tasks:
            _lm_eval_tiers(session, ["base", *tiers], tasks, manager, limit)
            return
        for t in tiers:
            rec = {"round": fed.round, "rank": t, **session.evaluate_tier(t)}
            typer.echo(json.dumps(rec))


def _lm_eval_tiers(session: Any, tiers: list[Any], tasks: list[str], manager: Any, limit: int | None) -> None:
    """lm-evaluation-harness on each tier ("base": the base model): a table each, eval/lm-eval-*.json."""
    from .. import lm_harness

    fed = session.federation
    for t in tiers:
        with session.serving(t) as model:
            results = lm_harness.score(
                model, session.tokenizer, tasks, manager, limit=limit, batch_size=session.cfg.eval.batch_size
            )
        scores = {"round": fed.round, "rank": t, "method": session.cfg.method, "model": session.cfg.model.name}
        path = session.dir.write_lm_eval(t, {**scores, "tasks": tasks, "limit": limit, **lm_harness.summary(results)})
        what = "base model" if t == "base" else f"rank {t}"
        typer.echo(f"\n{what} (round {fed.round}) -> {path}")
        typer.echo(lm_harness.table(results))


# the files report.compare_runs writes: an --out holding one is a user's earlier output, replaced only with --force
# (export's, per format: prelort.export.FORMAT_FILES)
COMPARISON_FILES = ("comparison.csv", "comparison.md", "plots/comparison_*.png")


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    rank: int = typer.Option(..., "--rank", help="Rank tier to export."),
    out: Path = typer.Option(..., "--out", help="Directory for the export (created if missing)."),
    fmt: str = typer.Option(
        "peft",
        "--format",
        help="peft: a PEFT adapter directory; merged: the base model with the adapter added (safetensors, Hugging "
        "Face layout, with its tokenizer); gguf-lora: a llama.cpp LoRA adapter, --out/adapter_model.gguf.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace the files of this format already in --out."),
) -> None:
    """Export the latest global model at rank T: a PEFT adapter, a merged model or a llama.cpp GGUF LoRA adapter.

    A rank that is no client's rank is exported too: the global adapter truncated to its first T dimensions. Every format computes the same s * B_T A_T. --out may not be /, the home or the current directory, nor inside a run directory's own files; an --out that already holds a file the format writes (peft: adapter_config.json, adapter_model.safetensors; merged: config.json, model*.safetensors, tokenizer files, ...; gguf-lora: adapter_model.gguf) is refused unless --force. gguf-lora supports llama and qwen2 bases (the shipped SmolLM2 and Qwen2.5-Coder GGUFs, tiny-llama, and GGUF files or directories of those architectures).
    """
    with _expected_failures("export"):
        from ..export import base_gguf_file, files_for
        from ..rundir import check_output_dir
        from ..runner import export_tier, open_federation

        check_output_dir(out, files_for(fmt), force=force, example="adapters/NAME")
        cfg, fed = open_federation(run_dir)
        if not 1 <= rank <= fed.spec.max_rank:
            _fail(f"--rank {rank} outside 1..{fed.spec.max_rank}")
        if rank not in fed.tiers():
            typer.echo(
                f"note: rank {rank} is not a client rank tier ({', '.join(map(str, fed.tiers()))}): "
                f"exporting the global adapter truncated to its first {rank} dimensions",
                err=True,
            )
        written = export_tier(fed, rank, cfg, out, fmt, force=force)
        base_gguf = base_gguf_file(cfg.model.name, cfg.model.gguf_file) if fmt == "gguf-lora" else None
    what, how = {
        "peft": (
            "adapter",
            f"load with peft.PeftModel.from_pretrained(base_model, '{out}'); base model: "
            f"prelort.load_base_model({cfg.model.name!r})",
        ),
        "merged": ("merged model", f"load with transformers.AutoModelForCausalLM.from_pretrained('{out}')"),
        "gguf-lora": ("llama.cpp LoRA adapter", f"run with llama.cpp: -m {base_gguf or 'BASE.gguf'} --lora {written}"),
    }[fmt]
    typer.echo(f"exported round-{fed.round} rank-{rank} {what} to {written} ({how})")


@app.command("report")
def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories (each with metrics.jsonl)."),
    out: Path | None = typer.Option(
        None, "--out", help="Where the comparison goes when several runs are given (default: ./comparison)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the comparison files already in --out."),
) -> None:
    """Write summary.csv and plots/*.png into each run; with several runs (or --out) also compare them.

    The comparison's --out may not be /, the home or the current directory, nor inside a run directory's own files; one that already holds comparison.csv, comparison.md or plots/comparison_*.png is refused unless --force.
    """
    with _expected_failures("report"):
        _report(run_dirs, out, force)


def _report(run_dirs: list[Path], out: Path | None, force: bool = False) -> None:
    from .. import report
    from ..rundir import RunDir, check_output_dir

    missing = [d for d in run_dirs if not RunDir(d).metrics_file.is_file()]
    if missing:
        _fail(
            "report: "
            + "; ".join(
                f"{d} "
                + ("does not exist" if not d.exists() else "has no metrics.jsonl (not a prelort run directory?)")
                for d in missing
            )
        )
    out_dir = out if out is not None else Path("comparison")
    if len(run_dirs) > 1 or out is not None:  # before any run's report is written
        check_output_dir(out_dir, COMPARISON_FILES, force=force, example="comparison")
    try:
        for run_dir in run_dirs:
            written = report.write_run_report(run_dir)
            names = ", ".join(p.name for p in written["plots"]) or "none"
            typer.echo(
                f"{run_dir}: wrote {written['summary_csv'].name} "
                f"({written['n_eval_records']} evaluation records) and plots/ ({names})"
            )
            for message in written["messages"]:
                typer.echo(f"  note: {message}")
            if len(run_dirs) == 1:
                if written["final_round"] is None:
                    typer.echo("no rank-tier evaluation yet")
                typer.echo(written["final_table"])
        if len(run_dirs) > 1 or out is not None:
            table = report.compare_runs(run_dirs, out_dir)
            typer.echo(table)
            typer.echo(f"comparison written to {out_dir}/ (comparison.csv, comparison.md, plots/)")
    except report.ReportError as e:
        _fail(f"report: {e}")


@app.command("verify-update")
def verify_update_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (its latest checkpoint defines the federation)."),
    file: Path = typer.Argument(..., help="NAME.safetensors of a client update, with NAME.json beside it."),
    round_: int | None = typer.Option(
        None, "--round", help="Round the update must be for (default: the run's next round, latest checkpoint + 1)."
    ),
) -> None:
    """Check a client update as the run's server would; exit 0 if accepted, 2 (reason printed) if rejected.

    Runs exactly the checks of the run's round loop: the safetensors + JSON format (nothing is unpickled; sizes and header checked before the data is read), bounded metadata, method, round, client id, rank bounds, modules, shapes, float32, finite values, the method's own metadata fields, and validation.max_update_norm / max_update_rms from RUN_DIR/config.yaml.

    The metadata must carry its round, which must be the round the run collects next (latest checkpoint + 1); pass --round N to check, e.g., an audited update of round N.
    """
    with _expected_failures("verify-update"):
        _verify_update(run_dir, file, round_)


@app.command("check")
def check_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory to validate."),
) -> None:
    """Check a run directory against the run-directory contract; exit 0 if it follows it, 2 (problems listed) if not.

    Checks the files a finished run leaves, config.yaml's key settings, every metrics.jsonl record (fields, ranges, no record twice), every checkpoint, audited update and exported adapter. Names, shapes and fields only: not whether a number is right.
    """
    with _expected_failures("check"):
        from ..check import check_run_dir, summary

        problems = check_run_dir(run_dir)
    if problems:
        for p in problems:
            typer.echo(p)
        typer.echo(f"{len(problems)} problem(s): {run_dir} does not follow the run-directory contract", err=True)
        raise typer.Exit(EXIT_USAGE)
    typer.echo(summary(run_dir))


# the files make_certificates writes (supernode_K for K = 1..N): an --out holding one is refused unless --force
CERT_FILES = ("ca.crt", "ca.key", "server.pem", "server.key", "supernode_*")


@app.command("certs")
def certs_cmd(
    out: Path = typer.Option(..., "--out", help="Directory for ca.crt, server.pem, server.key, supernode_K[.pub]."),
    supernodes: int = typer.Option(2, "--supernodes", help="Number of SuperNode key pairs."),
    host: list[str] | None = typer.Option(
        None, "--host", help="Extra DNS name or IP address of the SuperLink for its certificate (repeatable)."
    ),
    days: int = typer.Option(365, "--days", help="Validity of the certificates in days."),
    force: bool = typer.Option(False, "--force", help="Replace the credential files already in --out."),
) -> None:
    """Make test credentials for a TLS + authenticated Flower deployment (docs/deployment.md).

    A certificate authority (ca.crt, ca.key), the SuperLink's certificate signed by it for localhost, 127.0.0.1, ::1 and every --host (server.pem, server.key), and one authentication key pair per SuperNode (supernode_K, supernode_K.pub; OpenSSH EC P-384). For trials: in production the SuperLink's certificate comes from your CA and each SuperNode owner makes its own key pair. An --out that already holds one of these files is refused unless --force.
    """
    with _expected_failures("certs"):
        if supernodes < 0:
            _fail(f"--supernodes must be >= 0, got {supernodes}")
        if days < 1:
            _fail(f"--days must be >= 1, got {days}")
        from ..rundir import check_output_dir

        check_output_dir(out, CERT_FILES, force=force, example="certs")
        try:
            from ..flower.certs import make_certificates
        except ImportError:
            _fail("prelort certs needs the cryptography package: pip install 'prelort[flower]'")
        creds = make_certificates(out, supernodes, host or [], days)
    typer.echo(f"CA certificate:      {creds.ca_cert}")
    typer.echo(f"SuperLink cert/key:  {creds.server_cert} {creds.server_key}")
    for private, public in creds.supernode_keys:
        typer.echo(f"SuperNode key pair:  {private} {public}")


@app.command("probe")
def probe_cmd(
    model: str = typer.Option(
        ...,
        "--model",
        help="Base model: an alias (tiny-llama, smollm2-135m-instruct, ...), a local directory, a .gguf or a hub id.",
    ),
    ranks: str = typer.Option("2,4,8,16", "--ranks", help="Comma-separated LoRA ranks to try."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per training step (train.batch_size)."),
    max_length: int = typer.Option(
        128, "--max-length", help="Tokens per example (data.max_length); every example is this long."
    ),
    steps: int = typer.Option(3, "--steps", help="Timed training steps per rank (after one warm-up step)."),
    memory_budget: str | None = typer.Option(
        None,
        "--memory-budget",
        help="Memory this site may use, e.g. 4GB, 512MB, 8GiB: prints the largest rank that peaks under it.",
    ),
    device: str = typer.Option(
        "auto", "--device", help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."
    ),
    global_rank: int | None = typer.Option(
        None,
        "--global-rank",
        help="Measure as a client of a federation whose global adapter has this rank (clients.max_rank): each rank holds rank-R factors, masked.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the measurements as one JSON object instead of the table."
    ),
) -> None:
    """Which rank can this device afford? Run a few real LoRA training steps at each rank and measure them.

    Each rank trains in a fresh process (prelort's own model loading, LoRA and trainer), on a batch of --batch-size examples of exactly --max-length tokens: peak memory (resident set size on CPU, torch.cuda.max_memory_allocated on CUDA) and seconds per step, then the largest rank under --memory-budget. Declare it on the site's SuperNode as rank=R.
    """
    import json

    from ..probe import ProbeError, format_bytes, format_table, parse_memory, parse_ranks, probe

    with _expected_failures("probe"):
        try:
            rank_list = parse_ranks(ranks)
            budget = parse_memory(memory_budget) if memory_budget is not None else None
        except ProbeError as e:
            _fail(str(e))

        def say(m) -> None:
            if not as_json:
                if m.error is None:
                    typer.echo(
                        f"rank {m.rank}: peak {format_bytes(m.peak_memory_bytes)}, {m.seconds_per_step:.2f} s/step",
                        err=True,
                    )
                else:
                    typer.echo(f"rank {m.rank}: failed ({m.error})", err=True)

        report = probe(model, rank_list, batch_size, max_length, steps, budget, device, global_rank, progress=say)
    typer.echo(json.dumps(report.to_dict()) if as_json else format_table(report))


def _verify_update(run_dir: Path, file: Path, round_: int | None) -> None:
    from .. import config as config_mod
    from .. import methods
    from ..checkpoint import CheckpointError
    from ..rundir import RunDir
    from ..updates import UpdateRejected, load_update, max_payload_bytes, server_check, update_norm

    directory = RunDir(run_dir)
    try:
        spec, method = directory.checkpoint_spec()
        method_impl = methods.build(method, spec)
    except (CheckpointError, ValueError, KeyError) as e:
        _fail(f"{run_dir} is not a usable run directory: {e}", 1)
    validation = config_mod.ValidationConfig()  # the defaults, as a run without config.yaml would use
    if directory.config_file.is_file():
        try:
            validation = directory.load_config().validation
        except config_mod.ConfigError as e:
            _fail(str(e), 1)
    expected_round = round_ if round_ is not None else directory.latest_intact_round() + 1
    try:
        update = load_update(file, max_payload_bytes(spec), spec=spec)
        received = _received(run_dir, method_impl, update.client, expected_round)
        # what the round loop runs, with what the client received for the bound on the change
        server_check(update, spec, method_impl, validation, round_=expected_round, reference=received)
    except FileNotFoundError as e:
        _fail(str(e))
    except UpdateRejected as e:
        typer.echo(f"rejected: {e.reason}: {e.message}")
        raise typer.Exit(2) from None
    bounds = []
    if validation.max_update_norm is not None:
        bounds.append(f"bound {validation.max_update_norm:g}")
    if validation.max_update_rms is not None:
        bounds.append(f"rms bound {validation.max_update_rms:g}")
    typer.echo(
        f"accepted: client {update.client}, rank {update.rank}, round {update.round}, method {update.method}, "
        f"{update.num_examples} examples, norm {update_norm(update.tensors):.6g}"
        + (f" ({', '.join(bounds)})" if bounds else "")
    )


def _received(run_dir: Path, method_impl: Any, client: Any, round_: int) -> dict[str, Any] | None:
    """The adapter ``client`` received in round ``round_`` (recomputed from round ``round_ - 1``'s checkpoint, as
    the round loop sent it), or None when that checkpoint is not there or the client is none of the run's."""
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..federation import client_broadcast

    if type(client) is not int or not 0 <= client < len(method_impl.spec.client_ranks):
        return None
    try:
        _, state, info = load_checkpoint(run_dir, round_ - 1)
    except (CheckpointError, ValueError):
        return None
    seed = info.get("seed")
    if type(seed) is not int:
        return None
    return client_broadcast(method_impl, state, seed, round_, client)[1].adapter


def main() -> None:  # pragma: no cover
    app()
