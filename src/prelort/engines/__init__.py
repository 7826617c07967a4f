"""Engines: who carries a round's messages between the round loop and the clients.

An engine implements :class:`prelort.protocol.Engine` (``execute(tasks)``) and imports only the protocol
(:mod:`prelort.protocol`), never the round loop. One module per value of the config's ``engine:``:

* :mod:`.inprocess` (``engine: inprocess``): :class:`~.inprocess.InProcessEngine`, the clients in turn in
  this process;
* :mod:`.flower` (``engine: flower-sim`` and ``engine: flower``): :class:`~.flower.GridEngine`, the clients on
  Flower SuperNodes reached through the ServerApp's grid; :mod:`.flower_secagg` is its variant under
  ``privacy.secure_aggregation`` (:class:`~.flower_secagg.SecAggGridEngine`, rounds through SecAgg+).

:func:`prelort.runner.run` picks the engine from ``engine:``; on Flower the ServerApp
(:mod:`prelort.flower.serverapp`) builds the grid engine. Nothing here imports flwr at import time.
"""
