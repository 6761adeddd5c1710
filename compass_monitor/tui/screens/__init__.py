"""Screens of the TUI: run list, run heatmap, matrix drill-down, comparison, dialogs."""
