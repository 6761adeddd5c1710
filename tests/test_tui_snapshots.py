"""SVG snapshots of the main screens on seeded synthetic runs (fixed size, frozen clock, relative paths).

Update after an intended change of the look with ``pytest tests/test_tui_snapshots.py --snapshot-update``
and review the SVGs (``tests/__snapshots__/``) before committing them.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pytest_textual_snapshot")

from compass_monitor.tui.app import CompassApp
from synthetic_runs import write_synthetic_run
from compass_monitor.tui.widgets.density_map import DensityMap
from tui_helpers import wait_for

NOW = 1_700_010_000.0  # the frozen clock


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """runs/a (finished, 12 snapshots), runs/b (finished, 9), runs/c (running, heartbeat 2 h before NOW)."""
    root = tmp_path_factory.mktemp("tui-snapshots")
    write_synthetic_run(root / "runs" / "a", snapshots=12, seed=1)
    write_synthetic_run(root / "runs" / "b", snapshots=9, seed=2)
    write_synthetic_run(root / "runs" / "c", snapshots=4, seed=3, status="running")
    commit = json.loads((root / "runs" / "c" / "commit.json").read_text())
    commit["heartbeat"] = NOW - 7200
    (root / "runs" / "c" / "commit.json").write_text(json.dumps(commit))
    return root


@pytest.fixture
def runs(stored, monkeypatch):
    monkeypatch.chdir(stored)  # paths on screen are relative, so snapshots do not depend on tmp dirs
    return "runs"


def app_for(path: str, **kwargs) -> CompassApp:
    return CompassApp(path, clock=lambda: NOW, **kwargs)


async def run_loaded(pilot) -> None:
    def loaded() -> bool:
        view = getattr(pilot.app.screen, "view", None)
        return view is not None and view.null is not None  # the precision nulls come after the first paint

    await wait_for(pilot, loaded, what="the run")
    await pilot.pause()


async def list_loaded(pilot) -> None:
    await wait_for(pilot, lambda: len(pilot.app.screen.statuses) == 3, what="the run list")
    await pilot.pause()


def test_run_list(snap_compare, runs):
    assert snap_compare(app_for(runs), terminal_size=(80, 24), run_before=list_loaded)


def test_run_heatmap_80x24(snap_compare, runs):
    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(80, 24), run_before=run_loaded)


def test_run_heatmap_wide_scrubbed_and_sorted(snap_compare, runs):
    async def before(pilot):
        await run_loaded(pilot)
        await pilot.press("down", "down", "left", "left", "left", "s")

    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(130, 36), run_before=before)


def test_stale_run(snap_compare, runs):
    assert snap_compare(app_for(f"{runs}/c"), terminal_size=(80, 24), run_before=run_loaded)


async def drill(pilot, tab: str | None = None) -> None:
    await run_loaded(pilot)
    await pilot.press("down", "enter")
    density = pilot.app.screen.query_one(DensityMap)
    await wait_for(pilot, lambda: density.grid is not None, what="the density map")
    if tab:
        await pilot.press(tab)
        await pilot.pause(0.3)
        await wait_for(pilot, lambda: {"mask", "profiles", "spectral"} <= pilot.app.screen.shown, what="the drill-down")
    await pilot.pause()


def test_matrix_mask(snap_compare, runs):
    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(80, 24), run_before=drill)


def test_matrix_profiles_with_head_boundaries(snap_compare, runs):
    async def before(pilot):
        await drill(pilot, "2")

    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(100, 30), run_before=before)


def test_matrix_overlap_vs_baselines(snap_compare, runs):
    async def before(pilot):
        await drill(pilot, "3")

    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(100, 30), run_before=before)


async def compare(pilot, diff: bool) -> None:
    await run_loaded(pilot)
    await pilot.press("c", "enter")  # pick runs/b, the first other run
    screen = pilot.app.screen
    await wait_for(pilot, lambda: getattr(screen, "alignment", None) is not None and screen._jaccard
                   and all(v.null is not None for v in screen.views.values()), what="the comparison")
    if diff:
        await pilot.press("d")
    await pilot.pause()


def test_compare_side_by_side(snap_compare, runs):
    async def before(pilot):
        await pilot.pause()
        await compare(pilot, diff=False)

    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(100, 30), run_before=before)


def test_compare_difference(snap_compare, runs):
    async def before(pilot):
        await compare(pilot, diff=True)

    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(100, 30), run_before=before)


def test_help(snap_compare, runs):
    async def before(pilot):
        await run_loaded(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(80, 24), run_before=before)


def test_filter_dialog(snap_compare, runs):
    async def before(pilot):
        await run_loaded(pilot)
        await pilot.press("slash", *"q 1")
        await pilot.pause()

    assert snap_compare(app_for(f"{runs}/a"), terminal_size=(80, 24), run_before=before)


def test_newer_schema_message(snap_compare, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_synthetic_run(tmp_path / "runs" / "b", snapshots=1)
    meta = json.loads((tmp_path / "runs" / "b" / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (tmp_path / "runs" / "b" / "zarr.json").write_text(json.dumps(meta))
    runs = "runs"

    async def before(pilot):
        await wait_for(pilot, lambda: pilot.app.screen.error is not None, what="the error")
        await pilot.pause()

    assert snap_compare(app_for(f"{runs}/b"), terminal_size=(80, 24), run_before=before)
