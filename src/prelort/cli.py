"""The ``prelort`` command (DESIGN section 8)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Federated LoRA fine-tuning with heterogeneous client ranks (PreLort and baselines).",
)


@app.command("methods")
def methods_cmd() -> None:
    """List the federated methods with a one-line description each."""
    from . import methods

    for name, cls in methods.available().items():
        typer.echo(f"{name:10s} {cls.summary}")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="YAML config file (see examples/)."),
    out: Path = typer.Option(..., "--out", help="Run directory to create (or resume)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set train.lr=1e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete round in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-round lines on the console."),
) -> None:
    """Run a federated fine-tuning and write its run directory."""
    from . import config as config_mod
    from .federation import RoundFailed
    from .runner import run

    try:
        cfg = config_mod.load(config, set_ or [])
    except config_mod.ConfigError as e:
        _fail(str(e))
    from .flower.launch import FlowerRunError  # importable without flwr
    from .privacy import PrivacyError

    try:
        run(cfg, out, resume=resume, verbose=not quiet)
    except (FileExistsError, FileNotFoundError, RoundFailed, FlowerRunError) as e:
        _fail(str(e), 1)
    except (config_mod.ConfigError, PrivacyError) as e:
        _fail(str(e))
    typer.echo(f"run directory: {out}")


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Evaluate only this rank tier (default: every client rank)."),
) -> None:
    """Evaluate the run's latest global model per rank tier (prints JSON lines; the run is not modified)."""
    import json

    from .runner import Session

    try:
        session = Session.open(run_dir)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    fed = session.federation
    tiers = [rank] if rank is not None else fed.tiers()
    for t in tiers:
        if not 1 <= t <= fed.spec.max_rank:
            _fail(f"--rank {t} outside 1..{fed.spec.max_rank}")
        rec = {"round": fed.round, "rank": t, **session.evaluate_tier(t)}
        typer.echo(json.dumps(rec))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    rank: int = typer.Option(..., "--rank", help="Rank tier to export."),
    out: Path = typer.Option(..., "--out", help="Directory for the PEFT adapter."),
) -> None:
    """Export the latest global model at rank T as a standard PEFT adapter directory."""
    from .runner import export_tier, open_federation

    try:
        cfg, fed = open_federation(run_dir)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if not 1 <= rank <= fed.spec.max_rank:
        _fail(f"--rank {rank} outside 1..{fed.spec.max_rank}")
    export_tier(fed, rank, cfg, out)
    typer.echo(f"exported round-{fed.round} rank-{rank} adapter to {out} "
               f"(load with peft.PeftModel.from_pretrained(base_model, '{out}'))")


@app.command("report")
def report_cmd(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run directories (each with metrics.jsonl)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Where the comparison goes when several runs are given (default: ./comparison)."
    ),
) -> None:
    """Write summary.csv and plots/*.png into each run; with several runs (or --out) also compare them."""
    from . import report

    missing = [d for d in run_dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        for d in missing:
            what = "does not exist" if not d.exists() else "has no metrics.jsonl (not a prelort run directory?)"
            typer.echo(f"error: {d} {what}", err=True)
        raise typer.Exit(2)
    try:
        for run_dir in run_dirs:
            written = report.write_run_report(run_dir)
            names = ", ".join(p.name for p in written["plots"]) or "none"
            typer.echo(f"{run_dir}: wrote {written['summary_csv'].name} "
                       f"({written['n_eval_records']} evaluation records) and plots/ ({names})")
            for message in written["messages"]:
                typer.echo(f"  note: {message}")
            if len(run_dirs) == 1:
                if written["final_round"] is None:
                    typer.echo("no rank-tier evaluation yet")
                typer.echo(written["final_table"])
        if len(run_dirs) > 1 or out is not None:
            out_dir = out if out is not None else Path("comparison")
            table = report.compare_runs(run_dirs, out_dir)
            typer.echo(table)
            typer.echo(f"comparison written to {out_dir}/ (comparison.csv, comparison.md, plots/)")
    except report.ReportError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


@app.command("verify-update")
def verify_update_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (its latest checkpoint defines the federation)."),
    file: Path = typer.Argument(..., help="NAME.safetensors of a client update, with NAME.json beside it."),
    round_: Optional[int] = typer.Option(
        None, "--round", help="Round the update must be for (default: the run's next round, latest checkpoint + 1)."
    ),
) -> None:
    """Check a client update as the run's server would; exit 0 if accepted, 2 (reason printed) if rejected.

    Runs exactly the checks of the run's round loop: the safetensors + JSON format (nothing is unpickled; sizes and header checked before the data is read), bounded metadata, method, round, client id, rank bounds, modules, shapes, float32, finite values, the method's own fields (HetLoRA's pruned_to), and validation.max_update_norm / max_update_rms from RUN_DIR/config.yaml.

    The metadata must carry its round, which must be the round the run collects next (latest checkpoint + 1); pass --round N to check, e.g., an audited update of round N.
    """
    from . import config as config_mod
    from . import methods
    from .checkpoint import CheckpointError, latest_intact_round, spec_from_checkpoint
    from .updates import UpdateRejected, load_update, max_payload_bytes, server_check, update_norm

    try:
        spec, method = spec_from_checkpoint(run_dir)
        method_impl = methods.build(method, spec)
    except (CheckpointError, ValueError, KeyError) as e:
        _fail(f"{run_dir} is not a usable run directory: {e}", 1)
    validation = config_mod.ValidationConfig()  # the defaults, as a run without config.yaml would use
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            validation = config_mod.load(config_path).validation
        except config_mod.ConfigError as e:
            _fail(str(e), 1)
    expected_round = round_ if round_ is not None else latest_intact_round(run_dir) + 1
    try:
        update = load_update(file, max_payload_bytes(spec))
        server_check(update, spec, method_impl, validation, round_=expected_round)  # what the round loop runs
    except FileNotFoundError as e:
        _fail(str(e))
    except UpdateRejected as e:
        typer.echo(f"rejected: {e.reason}: {e.message}")
        raise typer.Exit(2)
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


def main() -> None:  # pragma: no cover
    app()
