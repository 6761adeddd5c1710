"""Figures and cross-run comparison of run stores (``compass-monitor report`` and ``compare``).

* :mod:`.crossrun`: Jaccard, independent baseline, consensus ratio, step alignment
  (numpy only; also used by the TUI's compare screen);
* :mod:`.compare_table`: the ``compare`` command's table and JSON;
* the figure modules and :mod:`.build` import matplotlib (the ``report`` extra),
  lazily: importing this package does not.
"""

from .crossrun import CrossRunError, CrossRunStats, StepAlignment, align_steps, cross_run_stats, pair_matrices

__all__ = ["CrossRunError", "CrossRunStats", "StepAlignment", "align_steps", "cross_run_stats", "pair_matrices"]
