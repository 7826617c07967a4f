"""The entry points: the command line and the Flower app (docs/design.md section 6).

* :mod:`.cli`: the ``prelort`` command (``python -m prelort``);
* :mod:`.serverapp` / :mod:`.clientapp`: the Flower ServerApp (the whole run: a Session driving a grid engine)
  and ClientApp (one client per SuperNode), which Flower loads from the app the launcher writes;
* :mod:`.launch`: starts a run on Flower (``engine: flower-sim`` / ``flower``): writes that app, starts a
  private simulation SuperLink or connects to a deployed one, follows the run.

The CLI and the two Flower apps are the top layer: nothing in prelort imports them. The launcher sits just
below the runner: the engine table (:mod:`prelort.engines`) names it as the Flower engines' launcher, so
:func:`prelort.runner.run` hands it those runs; it names the ServerApp and ClientApp only as strings in the
app it writes (Flower imports them in its own processes). Importing this package imports none of them.
"""
