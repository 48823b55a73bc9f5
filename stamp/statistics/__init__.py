"""``stamp statistics``: metrics with 95 % CIs and plots from ``patient-preds*.csv`` files.

Entry point :func:`compute_statistics` (returns a :class:`StatisticsResult`); bad input raises
:class:`StatisticsError`. Modules: ``tables`` (reading, validation, labels, CSV output),
``bootstrap`` (resampling, intervals), ``classification``, ``regression``, ``survival``, ``plots``.
"""

from stamp.statistics.api import StatisticsResult, compute_statistics
from stamp.statistics.tables import StatisticsError

__all__ = ["StatisticsError", "StatisticsResult", "compute_statistics"]
