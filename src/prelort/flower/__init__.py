"""Flower's codecs and tools, below the engines that use them: :mod:`.records` (prelort's messages as Flower
records) and :mod:`.certs` (test TLS certificates and SuperNode keys). Neither imports flwr at import time.

The Flower apps - the ServerApp and ClientApp and the launcher that starts them (``engine: flower-sim`` /
``flower``) - are entry points and live in :mod:`prelort.apps`; the engines that carry rounds over the grid
are :mod:`prelort.engines.flower` and, with ``privacy.secure_aggregation``, :mod:`prelort.engines.flower_secagg`.
"""
