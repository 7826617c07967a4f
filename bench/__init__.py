"""prelort's benchmarks: each module is a script, run from the repository root as ``python -m bench.NAME``.

A package so the scripts share ``_common`` (and the study its ``study_stats``) by relative import; it is not
part of the installed prelort (pyproject's ``packages.find`` looks in ``src/`` only).
"""
