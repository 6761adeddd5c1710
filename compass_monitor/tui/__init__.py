"""The terminal UI: ``compass-monitor tui PATH`` and ``compass-monitor replay RUN_DIR``.

Only this package imports Textual, and only when a TUI command runs; the core
never imports it. Modules:

* ``data`` (no Textual): run discovery, status, the heatmap's arrays, filters,
  sorting, density maps, profiles, overlaps, comparisons;
* ``source`` (no Textual): a run kept up to date by cheap polling of its commit file;
* ``app``: the Textual application; ``screens/`` and ``widgets/`` its parts;
  ``compass.tcss`` its styles.
"""
