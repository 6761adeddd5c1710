"""The terminal UI: ``compass-monitor tui PATH`` and ``compass-monitor replay RUN_DIR``.

Only this package imports Textual, and only when a TUI command runs; the core
never imports it. Its data layer imports neither Textual nor torch (a laptop
reads a cluster's runs with numpy and zarr only):

* ``data``: run discovery, status, the heatmap's arrays, filters, sorting,
  density maps, head geometry, profiles, overlaps, comparisons;
* ``source``: a run kept up to date by cheap polling of its commit file;
* ``follow``: the loop a worker runs to follow a run (reports through callbacks);
* ``timeline``: the one selected (matrix, snapshot) that every panel shows.

On top: ``launch`` (the commands' entry point: refuses to start without a
terminal), ``app`` (the Textual application), ``messages``, ``screens/`` and
``widgets/``, and ``compass.tcss`` (styles).
"""
