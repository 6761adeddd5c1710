"""The TUI's compare screen: the consensus view of three runs, the two-run table, refusals."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("textual")

from compass_monitor.report.crossrun import consensus_map, cross_run_stats
from compass_monitor.store import open_run
from compass_monitor.tui.data import RunView, block_density
from compass_monitor.tui.launch import compare_app
from compass_monitor.tui.screens.compare import CompareScreen
from synthetic_runs import SyntheticSpec, write_synthetic_run
from compass_monitor.tui.widgets.density_map import DensityMap
from compass_monitor.tui.widgets.details import compare_details

from report_helpers import growing_masks, tiny_params, write_mask_run
from tui_helpers import text_of, wait_for


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    spec = SyntheticSpec(layers=1)
    return [write_synthetic_run(root / f"s{seed}", snapshots=4 + seed, spec=spec, seed=seed) for seed in (1, 2, 3)]


def test_consensus_view_of_three_runs_shows_the_stored_overlaps(three_runs):
    asyncio.run(_consensus_view_of_three_runs_shows_the_stored_overlaps(three_runs))


async def _consensus_view_of_three_runs_shows_the_stored_overlaps(three_runs):
    app = compare_app(three_runs, poll_interval=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        assert isinstance(screen, CompareScreen) and screen.consensus
        await wait_for(pilot, lambda: screen.alignment is not None and screen._overlaps, what="the overlaps")
        await pilot.pause()
        runs = [open_run(p) for p in three_runs]
        # The cursor starts on the first matrix at the first aligned step; go to the last (step 50).
        await pilot.press("end")
        await wait_for(pilot, lambda: (screen._selected() in screen._overlaps), what="the overlaps at the last step")
        await pilot.pause()
        stats = cross_run_stats(runs)
        k, t = screen._selected()
        assert int(screen.alignment.steps[t]) == stats.step == 50
        details = text_of(screen, "#compare-details")
        j, base = stats.matrix_jaccard(k)
        assert f"A-B {j[0, 1]:.3f} ({base[0, 1]:.3f})" in details
        assert f"B-C {j[1, 2]:.3f} ({base[1, 2]:.3f})" in details
        group = stats.group("one", [k])
        assert f"{group.consensus[3] / group.numel:.3f}" in details and "consensus C=k/3" in details
        assert "step 50 (5/5)" in text_of(screen, "#compare-header")
        # The map is the block mean of C = mean_r M^(r) over the matrix (recomputed from the masks).
        density_map = screen.query_one("#consensus-map", DensityMap)
        await wait_for(pilot, lambda: density_map.grid is not None, what="the consensus map")
        c = consensus_map(runs, stats.rows[:, k], stats.snapshots)
        rows, cols = density_map.grid.shape
        np.testing.assert_allclose(density_map.grid, block_density(c, rows, cols), rtol=1e-6)
        # Moving the cursor: details follow the selected matrix and step.
        await pilot.press("down", "left")
        await wait_for(pilot, lambda: screen._selected() in screen._overlaps, what="the next overlaps")
        await pilot.pause()
        k2, t2 = screen._selected()
        assert t2 == t - 1 and k2 != k
        assert screen.views["a"].params[int(screen.alignment.rows[0, k2])].name in text_of(screen, "#compare-details").replace("\n", "")
        assert f"step {int(screen.alignment.steps[t2])} ({t2 + 1}/5)" in text_of(screen, "#compare-header")
        await pilot.press("d")  # A - B needs two runs: a warning, the consensus view stays
        assert screen.consensus


def test_two_runs_toggle_to_the_consensus_view(three_runs):
    asyncio.run(_two_runs_toggle_to_the_consensus_view(three_runs))


async def _two_runs_toggle_to_the_consensus_view(three_runs):
    app = compare_app(three_runs[:2], poll_interval=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: screen.alignment is not None and screen._jaccard, what="the Jaccard")
        assert not screen.consensus and "mask Jaccard" in text_of(screen, "#compare-details")
        await pilot.press("k")
        await pilot.pause()
        assert screen.consensus and "consensus C=k/2" in text_of(screen, "#compare-details")
        assert screen.query_one("#consensus-map").display


def test_masks_of_runs_of_different_bases_are_not_compared_on_screen(tmp_path, rng):
    asyncio.run(_masks_of_runs_of_different_bases_are_not_compared_on_screen(tmp_path, rng))


async def _masks_of_runs_of_different_bases_are_not_compared_on_screen(tmp_path, rng):
    params = tiny_params(layers=1)
    masks = growing_masks(params, 2, rng)
    a = write_mask_run(tmp_path / "a", params, [1, 2], masks).path
    fingerprints = np.ones((len(params), 2), dtype=np.int64)
    b = write_mask_run(tmp_path / "b", params, [1, 2], masks, fingerprints=fingerprints).path
    app = compare_app([a, b], poll_interval=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: screen.base_error is not None, what="the refusal")
        await pilot.pause()
        assert "different base weights" in text_of(screen, "#compare-header")
        # Densities still show side by side; the masks' Jaccard is not computed.
        assert screen.alignment is not None and not screen._overlaps
        assert "(independent -)" in text_of(screen, "#compare-details")
        await pilot.press("k")
        await pilot.pause()
        assert "masks not compared" in text_of(screen, "#compare-details")
        assert not screen._overlaps


def test_flips_row_keeps_numbers_apart(tmp_path, rng):
    params = tiny_params(layers=1)
    masks_a = growing_masks(params, 3, rng)
    masks_b = [[m.copy() for m in snap] for snap in masks_a]
    masks_b[2][0][:4, :] = ~masks_b[2][0][:4, :]  # B flips more than A at the last snapshot
    a = RunView.load(open_run(write_mask_run(tmp_path / "a", params, [1, 2, 3], masks_a).path))
    b = RunView.load(open_run(write_mask_run(tmp_path / "b", params, [1, 2, 3], masks_b).path))
    text = compare_details(a, b, 0, 0, 2, 2, None).plain
    row = next(line for line in text.splitlines() if line.startswith("flips"))
    values = [float(v) for v in row.split()[1:]]
    assert values == pytest.approx([a.flip_rate[2, 0], b.flip_rate[2, 0], a.flip_rate[2, 0] - b.flip_rate[2, 0]], abs=1e-4)
    assert values[2] < 0


def test_compare_tui_needs_a_terminal(three_runs):
    out = subprocess.run([sys.executable, "-m", "compass_monitor.cli", "compare", "--tui", *map(str, three_runs)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--tui needs a terminal" in out.stderr
