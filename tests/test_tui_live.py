"""The real app, driven by Textual's pilot, on a run that another process is writing with CompassMonitor."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("textual")

import compass_monitor
from compass_monitor.tui.app import CompassApp
from compass_monitor.tui.screens.compare import CompareScreen
from compass_monitor.tui.screens.dialogs import FilterScreen, PickRunScreen
from compass_monitor.tui.screens.matrix import MatrixScreen
from compass_monitor.tui.screens.run import RunScreen
from synthetic_runs import SyntheticSpec, write_synthetic_run
from compass_monitor.tui.widgets.density_map import DensityMap
from tui_helpers import heatmap_text, read_line, text_of, wait_for

WRITER = Path(__file__).with_name("tui_live_writer.py")


@pytest.fixture
def live_writer(tmp_path):
    run_dir = tmp_path / "runs" / "live"
    # The writer imports the same compass_monitor as this test.
    env = {**os.environ, "PYTHONPATH": str(Path(compass_monitor.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(run_dir), "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    yield proc, run_dir
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def send(proc, command: str) -> None:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()


def test_follow_scrub_filter_drill_compare_on_a_growing_run(live_writer):
    asyncio.run(follow_scrub_filter_drill_compare(*live_writer))


async def follow_scrub_filter_drill_compare(proc, run_dir: Path) -> None:
    root = run_dir.parent
    # A finished run with the same matrix names and shapes, to compare with.
    write_synthetic_run(root / "other", snapshots=8, spec=SyntheticSpec(hidden=32, intermediate=48, head_dim=8, every_n_steps=1))
    app = CompassApp(root, poll_interval=0.1)
    async with app.run_test(size=(100, 30)) as pilot:
        assert await read_line(proc) == "ready 2"
        # The run list shows both runs; open the live one.
        await wait_for(pilot, lambda: [(s.name, s.status) for s in app.screen.statuses] == [("live", "live"), ("other", "finished")],
                       what="the run list")
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, RunScreen)
        await wait_for(pilot, lambda: screen.view is not None and screen.view.num_snapshots == 2, what="the first snapshots")
        assert screen.status_word() == "LIVE"
        assert "LIVE" in text_of(screen, "#run-header")
        assert len(screen.order) == 14  # 2 layers x q, k, v, o, gate, up, down
        assert heatmap_text(screen.heatmap)[1].startswith("L0 q")

        # New snapshots appear while following, with no key pressed. (How soon after their commit
        # is measured by bench/bench_tui.py, not asserted here: a loaded CI machine is no stopwatch.)
        send(proc, "more 3")
        assert await read_line(proc) == "ready 5"
        await wait_for(pilot, lambda: screen.view.num_snapshots == 5, timeout=30, what="new snapshots")
        assert screen.timeline.position == 4 and screen.timeline.following

        # Scrubbing pauses following; new snapshots then leave the cursor where it is; f resumes.
        await pilot.press("left")
        assert screen.timeline.position == 3 and screen.status_word() == "PAUSED"
        send(proc, "more 1")
        assert await read_line(proc) == "ready 6"
        await wait_for(pilot, lambda: screen.view.num_snapshots == 6, timeout=30, what="a snapshot while paused")
        assert screen.timeline.position == 3
        await pilot.press("home")
        assert screen.timeline.position == 0 and "(1/6)" in text_of(screen, "#run-header")
        await pilot.press("f")
        assert screen.timeline.position == 5 and screen.status_word() == "LIVE"

        # Filter: type and layer range.
        await pilot.press("slash")
        assert isinstance(app.screen, FilterScreen)
        await pilot.press(*"q 1", "enter")
        await wait_for(pilot, lambda: app.screen is screen, what="the filter to close")
        assert [screen.view.params[i].name for i in screen.order] == ["model.layers.1.self_attn.q_proj.weight"]
        assert "filter 'q 1'" in text_of(screen, "#run-hint")
        await pilot.press("slash", "ctrl+u", *"down", "enter")
        await wait_for(pilot, lambda: app.screen is screen, what="the filter to close")
        assert [heatmap_text(screen.heatmap)[y][:7].strip() for y in (1, 2)] == ["L0 down", "L1 down"]

        # Sort by most changed at the cursor: densities do not increase down the rows.
        await pilot.press("slash", "ctrl+u", "enter")
        await pilot.press("s")
        density = screen.view.density[screen.timeline.position]
        values = [density[i] for i in screen.order]
        assert values == sorted(values, reverse=True)
        await pilot.press("s", "s")  # back to layer order
        assert screen.sort == "layer"

        # The selected matrix stays selected through filters and sorts (L0 down, chosen by the filter above).
        assert screen.view.params[screen.selected_index].name == "model.layers.0.mlp.down_proj.weight"
        await pilot.press("pageup")
        assert screen.view.params[screen.selected_index].name == "model.layers.0.self_attn.q_proj.weight"

        # Drill down: the mask map loads in a worker; flips mode; profiles; overlap.
        await pilot.press("enter")
        matrix = app.screen
        assert isinstance(matrix, MatrixScreen)
        density_map = matrix.query_one(DensityMap)
        await wait_for(pilot, lambda: density_map.grid is not None, what="the density map")
        assert density_map.row_heads  # q: heads of 8 rows (from the run metadata)
        await pilot.press("x")
        await wait_for(pilot, lambda: density_map.grid is not None and "flips" in text_of(matrix, "#mask-legend"), what="the flips map")
        await pilot.press("2")
        await pilot.press("3")
        assert "at step 6" in text_of(matrix, "#overlap-table")
        await pilot.press("left")
        assert screen.timeline.position == 4 and "at step 5" in text_of(matrix, "#overlap-table")
        await pilot.press("escape")
        assert app.screen is screen

        # Compare with the other run: side by side, then the difference, with mask Jaccard.
        await pilot.press("c")
        assert isinstance(app.screen, PickRunScreen)
        await pilot.press("enter")
        compare = app.screen
        assert isinstance(compare, CompareScreen)
        await wait_for(pilot, lambda: compare.alignment is not None, what="the comparison")
        assert compare.alignment.by_step and len(compare.alignment.rows_a) == 14
        # The synthetic run is not of the live run's base: densities compare, masks do not (no Jaccard).
        await wait_for(pilot, lambda: compare.base_error is not None, what="the base check")
        assert "different base weights" in text_of(compare, "#compare-header")
        assert "independent -" in text_of(compare, "#compare-details")
        await pilot.press("d")
        assert compare.query_one("#heat-diff").display and "A - B" in text_of(compare, "#compare-hint")
        await pilot.press("escape")

        # The writer dies without closing the run: the badge says CRASHED (its process is gone).
        proc.kill()
        proc.wait(timeout=30)
        await wait_for(pilot, lambda: screen.status_word().startswith("CRASHED"), timeout=30, what="CRASHED")
        await pilot.pause(1.1)  # the header refreshes every second
        assert "CRASHED" in text_of(screen, "#run-header")
