"""prelort on Flower 1.42 (Message API): ServerApp, ClientApp, records, launch, test credentials.

``run_on_flower(cfg, out, resume, verbose)`` runs a federation with ``engine: flower-sim`` (Flower's
simulation runtime on this machine) or ``engine: flower`` (a deployed SuperLink and SuperNodes; see
docs/deployment.md). Flower is imported lazily: ``import prelort`` works without it.

Modules: :mod:`.records` (messages as Flower records), :mod:`.serverapp` / :mod:`.clientapp` (the Flower
components), :mod:`.launch` (starting runs), :mod:`.certs` (test TLS certificates and SuperNode keys) and
:mod:`.secagg` (one SecAgg+ aggregation in the simulation runtime, for tests and benchmarks; the
encoding itself is :mod:`prelort.secure_sums`). The engines that carry rounds over the grid are
:mod:`prelort.engines.flower` and, with ``privacy.secure_aggregation``, :mod:`prelort.engines.flower_secagg`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config


def run_on_flower(cfg: "Config", out: Path, resume: bool = False, verbose: bool = True) -> Path:
    """Run the federation of ``cfg`` on Flower; returns the run directory (see :mod:`.launch`)."""
    from .launch import run_on_flower as _run

    return _run(cfg, out, resume=resume, verbose=verbose)


__all__ = ["run_on_flower"]
