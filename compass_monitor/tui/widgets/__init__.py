"""Widgets of the TUI: heatmap, density map, detail text."""
