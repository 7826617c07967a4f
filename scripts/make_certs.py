#!/usr/bin/env python
"""Make test TLS certificates and SuperNode key pairs for a Flower deployment (see docs/deployment.md).

usage: python scripts/make_certs.py OUT_DIR [--supernodes N] [--host NAME_OR_IP ...] [--days D]
Same as ``python -m prelort.flower.certs``; needs the ``cryptography`` package (``pip install prelort[flower]``).
"""

from __future__ import annotations

from prelort.flower.certs import main

if __name__ == "__main__":
    raise SystemExit(main())
