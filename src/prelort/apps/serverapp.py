"""The Flower ServerApp: the whole prelort run (Session + Federation) driving Flower SuperNodes.

Why a ServerApp ``main`` and not a ``Strategy`` subclass: a Flower Strategy owns the round loop
(``Strategy.start``) around one ArrayRecord of global arrays that every client shares, with its own
evaluation and stopping rules. prelort's round protocol - seeded sampling, a different prefix per client
rank, validation of every update, method-specific aggregation, per-tier evaluation, atomic checkpoints and
resume - already lives in :class:`prelort.federation.Federation` driven by
:meth:`prelort.runner.Session.run`, and the in-process engine runs exactly that code. A Strategy would
have to override ``start``, ``configure_train``, ``aggregate_train`` and both evaluate hooks, i.e. all of
it, and keep the real state outside its ArrayRecord. So the ServerApp runs ``Session.run`` with a
:class:`~prelort.engines.flower.GridEngine`: the only engine-specific part is how tasks reach the clients.

With ``privacy.secure_aggregation`` the engine is a
:class:`~prelort.engines.flower_secagg.SecAggGridEngine`: each round's tasks go through Flower's legacy
SecAgg+ workflow on the same grid, and the round is finished from the secure sums.

Settings arrive in ``context.run_config`` (written by :func:`prelort.apps.launch.run_on_flower` into
the app's ``[tool.flwr.app.config]``): ``prelort-config`` (the resolved config as JSON), ``run-dir``
(absolute path, on the host that runs this ServerApp), ``resume`` and ``verbose``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..engines.flower import GridEngine, site_declared_config

log = logging.getLogger("prelort")

app = ServerApp()

RUN_CONFIG_KEYS = ("prelort-config", "run-dir", "resume", "verbose")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from ..config import from_dict
    from ..runner import Session

    rc = dict(context.run_config)
    missing = [k for k in RUN_CONFIG_KEYS if k not in rc]
    if missing:
        raise ValueError(
            f"run_config lacks {missing}: start prelort on Flower with `prelort run CONFIG --out DIR` "
            "(engine: flower or flower-sim), which writes them"
        )
    config_json = str(rc["prelort-config"])
    cfg = from_dict(json.loads(config_json))
    nodes = None
    if cfg.engine == "flower":  # SuperNodes may declare their site's rank: the run's ranks are theirs
        cfg, nodes = site_declared_config(grid, cfg)
        config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    session = Session(cfg, Path(str(rc["run-dir"])), resume=bool(rc["resume"]), verbose=bool(rc["verbose"]))
    if nodes is not None:  # greeted before run.log existed
        nodes.log_assignments()
    if cfg.engine == "flower":
        from .launch import deployment_gaps

        for gap in deployment_gaps(cfg):  # allowed by flower.allow_insecure, or the launcher would have refused
            log.warning("INSECURE FLOWER DEPLOYMENT (flower.allow_insecure: true): %s", gap)
    engine = (
        _secagg_engine(grid, context, cfg, config_json, session, nodes)
        if cfg.privacy.secure_aggregation
        else GridEngine(grid, cfg, config_json, nodes)
    )
    session.run(engine)
    if engine.round_seconds:
        log.info("flower: client round trips %s s", ", ".join(f"{s:.2f}" for s in engine.round_seconds))


def _secagg_engine(grid: Grid, context: Context, cfg, config_json: str, session, nodes=None):
    from ..engines.flower_secagg import SecAggGridEngine
    from ..methods import GlobalState
    from ..secure_sums import SecAggLayout, max_weight_bound

    fed = session.federation
    # W for data-size weights: the federation's number of training examples (what the clients' partitions
    # add up to, derived from the config the clients share); a weight that depends on the update: the method's weight_bound.
    total = sum(len(p) for p in session.partitions if isinstance(p, list))  # a broken site file counts 0
    if cfg.privacy.dp:  # every client uploads with weight 1 (client-level DP), so rho_k = 1 exactly
        max_weight, why = 1.0, "privacy.dp: uniform weights"
    else:
        max_weight = max_weight_bound(fed.method, total, cfg.validation.max_update_norm)
        why = (
            f"{fed.method.name}'s bound from validation.max_update_norm"
            if fed.method.weight_depends_on_update
            else "the federation's number of training examples"
        )
    log.info("secure aggregation: SecAgg+ with weight bound W=%g (%s)", max_weight, why)

    def layout_of() -> SecAggLayout:
        assert isinstance(fed.state, GlobalState), "the federation has not started"
        return SecAggLayout.of(fed.state)

    return SecAggGridEngine(grid, cfg, config_json, context, layout_of, max_weight, nodes=nodes)
