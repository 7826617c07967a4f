"""The metric registry: what evaluation computes, metrics.jsonl records, reports show and ``prelort check``
checks (docs/design.md section 4).

A :class:`Metric` says everything about one metric: its field in ``metrics.jsonl``, how it is computed from
one evaluation's per-example results (:class:`EvalResults`), its valid range, whether higher is better,
and how tables, plots and the run log show it. Evaluation, training records, ``prelort check``, the
run-directory reader, tables and plots all iterate :func:`available`, in registration order, which is the
order of the fields in every record and of the columns in every table.

Adding a metric is one file that builds a :class:`Metric`, plus its registration: :func:`register` (the
built-in ones are :mod:`.accuracy`, :mod:`.rouge_l` and :mod:`.perplexity`, registered below in their listed
order, which no import sorter can change; tests/metrics/nll.py registers one from the test suite); :func:`unregister` removes it again. Every registered metric is averaged over runs the
same way in comparisons (mean and sample standard deviation); how it pools the examples of one
evaluation is its own ``compute``.
"""

from .accuracy import ACCURACY
from .base import RECORD_FIELDS, EvalResults, Metric, available, compute, get, names, register, unregister
from .perplexity import PERPLEXITY
from .rouge_l import ROUGE_L

# The built-in metrics, in the order records and tables have always listed them (registration order is the
# order of the fields in every record and of the columns in every table).
for _builtin in (ACCURACY, ROUGE_L, PERPLEXITY):
    register(_builtin)

__all__ = ["RECORD_FIELDS", "EvalResults", "Metric", "available", "compute", "get", "names", "register", "unregister"]
