"""The app on stored runs: bad input gives a message (never a traceback), replay plays, help lists every key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("textual")

from compass_monitor.tui.app import CompassApp
from compass_monitor.tui.screens.dialogs import HelpScreen
from compass_monitor.tui.screens.matrix import MatrixScreen
from compass_monitor.tui.screens.run import RunScreen
from compass_monitor.tui.screens.runs import RunsScreen
from compass_monitor.tui.screens.compare import CompareScreen
from synthetic_runs import SyntheticSpec, write_synthetic_run
from tui_helpers import text_of, wait_for


def run_app(app: CompassApp, body, size=(80, 24)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await body(pilot)

    asyncio.run(main())


def shown_on_run_screen(pilot) -> str:
    screen = pilot.app.screen
    return screen.heatmap.empty_text if screen.view is None else ""


def corrupt_counts(run: Path) -> None:
    chunks = sorted(p for p in (run / "metrics" / "counts").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[0].write_bytes(b"this is not zstd")


def half_written(run: Path) -> None:
    for child in run.iterdir():
        if child.name not in ("zarr.json",):
            if child.is_dir():
                import shutil

                shutil.rmtree(child)
            else:
                child.unlink()
    (run / "commit.json").write_text('{"snapshots": 3, "sta')


def newer_schema(run: Path) -> None:
    meta = json.loads((run / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (run / "zarr.json").write_text(json.dumps(meta))


def foreign_group(run: Path) -> None:
    meta = json.loads((run / "zarr.json").read_text())
    meta["attributes"]["format"] = "something-else"
    (run / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (corrupt_counts, "cannot read"),
        (half_written, "cannot read"),
        (newer_schema, "Upgrade compass-monitor"),
        (foreign_group, "not a compass-monitor run"),
    ],
)
def test_damaged_store_gives_a_message_not_a_traceback(tmp_path, damage, expected):
    run = write_synthetic_run(tmp_path / "run", snapshots=3)
    damage(run)

    async def body(pilot):
        assert isinstance(pilot.app.screen, RunScreen)
        await wait_for(pilot, lambda: pilot.app.screen.error is not None, what="an error message")
        assert expected in shown_on_run_screen(pilot)
        assert pilot.app.screen.status_word() == "ERROR"
        await pilot.press("enter", "slash", "escape", "right", "c")  # keys on an unreadable run do nothing harmful

    run_app(CompassApp(run, poll_interval=0.05), body)


@pytest.mark.parametrize("make", ["missing", "empty", "files"])
def test_path_without_runs_says_so_and_keeps_watching(tmp_path, make):
    path = tmp_path / "runs"
    if make != "missing":
        path.mkdir()
    if make == "files":
        (path / "notes.txt").write_text("hello")
        (path / "sub").mkdir()

    async def body(pilot):
        screen = pilot.app.screen
        assert isinstance(screen, RunsScreen)
        expected = "does not exist (yet)" if make == "missing" else "no compass-monitor run under"
        await wait_for(pilot, lambda: expected in text_of(screen, "#runs-message"), what="the message")
        # A run that appears later is picked up (e.g. `compass-monitor tui` started before training).
        write_synthetic_run(path if make == "missing" else path / "new", snapshots=2)
        if make == "missing":
            await wait_for(pilot, lambda: isinstance(pilot.app.screen, RunScreen), what="the new run to open")
        else:
            await wait_for(pilot, lambda: len(screen.statuses) == 1, what="the new run in the list")

    run_app(CompassApp(path), body)


def test_replay_starts_at_the_first_snapshot_and_plays_forward(tmp_path):
    run = write_synthetic_run(tmp_path / "run", snapshots=30, spec=SyntheticSpec(layers=1))

    async def body(pilot):
        screen = pilot.app.screen
        await wait_for(pilot, lambda: screen.view is not None, what="the run")
        assert screen.timeline.position <= 1 and screen.status_word().startswith("REPLAY ▶")
        await wait_for(pilot, lambda: screen.timeline.position >= 2, timeout=30, what="playback")
        await pilot.press("space")
        paused_at = screen.timeline.position
        assert screen.status_word() == "REPLAY ❚❚"
        await pilot.pause(0.3)
        assert screen.timeline.position == paused_at
        await pilot.press("space")
        await pilot.press("plus", "plus")  # 40 snapshots per second
        await wait_for(pilot, lambda: screen.timeline.at_end and not screen.playing, timeout=60, what="the end")
        assert screen.status_word() == "FINISHED"

    run_app(CompassApp(run, replay=True, speed=10.0), body)


def test_help_lists_every_key_of_every_screen(tmp_path):
    run = write_synthetic_run(tmp_path / "run", snapshots=2)

    async def body(pilot):
        await pilot.press("question_mark")
        help_screen = pilot.app.screen
        assert isinstance(help_screen, HelpScreen)
        text = text_of(help_screen, "#help-text")
        for cls in (CompassApp, RunsScreen, RunScreen, MatrixScreen, CompareScreen):
            for binding in cls.BINDINGS:
                assert binding.description in text, binding
        await pilot.press("escape")
        assert not isinstance(pilot.app.screen, HelpScreen)

    run_app(CompassApp(run), body)


def test_spectral_tab_shows_series_when_the_run_has_them(tmp_path, monkeypatch):
    """Contract for the spectral metrics: ``Run.spectral(param) -> {name: (steps, values)}``; absent -> a note."""
    import numpy as np

    from compass_monitor.store import Run

    run = write_synthetic_run(tmp_path / "run", snapshots=4)

    async def open_spectral(pilot):
        await wait_for(pilot, lambda: pilot.app.screen.view is not None, what="the run")
        await pilot.press("enter", "4")
        matrix = pilot.app.screen
        await wait_for(pilot, lambda: "spectral" in matrix.shown, what="the spectral tab")
        return matrix

    async def without(pilot):
        matrix = await open_spectral(pilot)
        assert "no spectral metrics" in text_of(matrix, "#spectral-note")

    run_app(CompassApp(run), without)

    def spectral(self, info):
        steps = np.array([10, 20, 30, 40])
        return {"nss": (steps, np.array([0.0, 1e-5, 2e-5, 3e-5])), "max_angle_left_deg": (steps, np.array([0.0, 0.1, 0.2, 0.3]))}

    monkeypatch.setattr(Run, "spectral", spectral, raising=False)

    async def with_series(pilot):
        matrix = await open_spectral(pilot)
        assert "max_angle_left_deg at step 40: 0.3" in text_of(matrix, "#spectral-note")
        await pilot.press("o")
        assert "nss at step 40: 3e-05" in text_of(matrix, "#spectral-note")

    run_app(CompassApp(run), with_series)


def test_run_list_names_runs_by_folder(tmp_path):
    """runs/demo, runs/demo-s1 and runs/demo-tty all carry the metadata name "demo": the list tells them apart."""
    from synthetic_runs import SyntheticWriter
    from textual.widgets import DataTable

    for folder in ("demo", "demo-s1", "demo-tty"):
        writer = SyntheticWriter(tmp_path / "runs" / folder, name="demo")
        writer.append()
        writer.finish()

    async def body(pilot):
        screen = pilot.app.screen
        await wait_for(pilot, lambda: len(screen.statuses) == 3, what="the run list")
        await pilot.pause()
        table = screen.query_one(DataTable)
        names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert names == ["demo", "demo-s1 (demo)", "demo-tty (demo)"]

    run_app(CompassApp(tmp_path / "runs"), body)
