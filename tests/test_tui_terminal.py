"""The TUI and the terminal it runs in: no terminal (refused at once), NO_COLOR, small terminals, a crash's exit status."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("textual")

from compass_monitor.tui.app import CompassApp
from compass_monitor.tui.screens.matrix import MatrixScreen
from compass_monitor.tui.screens.run import RunScreen
from compass_monitor.tui.widgets.density_map import DensityMap
from synthetic_runs import SyntheticSpec, write_synthetic_run
from tui_helpers import heatmap_text, text_of, wait_for
from tui_pty import run_in_pty

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """A finished run of 5 layers (35 matrices, more rows than 80x24 shows) and 6 snapshots."""
    return write_synthetic_run(tmp_path_factory.mktemp("terminal") / "run", snapshots=6, spec=SyntheticSpec(layers=5), seed=4)


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR",)}
    env.update({"PYTHONPATH": str(ROOT), "TERM": "xterm-256color", **extra})
    return env


@pytest.mark.parametrize("command", ["tui", "replay"])
def test_without_a_terminal_it_refuses_at_once_and_points_at_summary(stored, command, tmp_path):
    out_file = tmp_path / "out.txt"
    start = time.monotonic()
    with open(out_file, "w") as out:
        # The timeout only bounds a hang (before the fix it ran until killed, writing escape codes).
        result = subprocess.run([sys.executable, "-m", "compass_monitor.cli", command, str(stored)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.PIPE, text=True, timeout=60, env=env_for())
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a terminal" in lines[0] and "compass-monitor summary" in lines[0], result.stderr
    assert out_file.read_text() == ""  # no escape codes in the file
    print(f"{command} without a terminal exited after {elapsed:.2f} s")


def run_app(app: CompassApp, body, size=(80, 24)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await body(pilot)

    asyncio.run(main())


@pytest.mark.parametrize("size", [(80, 24), (60, 16), (40, 10)])
def test_no_color_and_small_terminals_render_every_screen(stored, monkeypatch, size):
    """NO_COLOR crashed the first frame (segments without a style); small sizes must still show the numbers."""
    monkeypatch.setenv("NO_COLOR", "1")

    async def body(pilot):
        screen = pilot.app.screen
        assert isinstance(screen, RunScreen) and pilot.app.no_color
        await wait_for(pilot, lambda: screen.view is not None, what="the run")
        await pilot.pause()
        assert "step 60 (6/6)" in text_of(screen, "#run-header")
        await pilot.press("enter")
        matrix = pilot.app.screen
        assert isinstance(matrix, MatrixScreen)
        await wait_for(pilot, lambda: "mask" in matrix.shown or matrix.query_one(DensityMap).size.height < 2, what="the mask map")
        for tab in "234":
            await pilot.press(tab)
            await pilot.pause()
        assert "step 60" in text_of(matrix, "#matrix-header")
        await pilot.press("escape")
        assert pilot.app.screen is screen

    run_app(CompassApp(stored), body, size=size)


def test_hidden_rows_are_counted_and_follow_the_cursor(stored):
    async def body(pilot):
        screen = pilot.app.screen
        await wait_for(pilot, lambda: screen.view is not None, what="the run")
        await pilot.pause()
        shown = screen.heatmap.size.height - 1
        assert 0 < shown < 35
        assert heatmap_text(screen.heatmap)[0].startswith(f"1-{shown} of 35")
        await pilot.press(*["down"] * shown)  # one past the last visible row: the view scrolls by one
        await pilot.pause()
        assert heatmap_text(screen.heatmap)[0].startswith(f"2-{shown + 1} of 35")

    run_app(CompassApp(stored), body, size=(80, 24))


def test_q_exits_zero_and_a_crash_exits_non_zero_in_a_real_terminal(stored):
    quit_code, _ = run_in_pty([sys.executable, "-m", "compass_monitor.cli", "tui", str(stored)], env=env_for(),
                              keys=[(b"global sparsity", b"q")], timeout=90)
    assert quit_code == 0
    crash = ("import sys; from compass_monitor.tui.widgets.heatmap import Heatmap\n"
             "def broken(self, y): raise RuntimeError('drawing failed')\n"
             "Heatmap.render_line = broken\n"
             "from compass_monitor.cli import main; sys.exit(main(['tui', sys.argv[1]]))")
    code, output = run_in_pty([sys.executable, "-c", crash, str(stored)], env=env_for(), timeout=90)
    assert code == 1, output[-2000:]
    assert b"drawing failed" in output


def test_replay_takes_one_run_directory(stored, tmp_path, capsys):
    """`replay runs` opened the run list though its help says RUN_DIR: a folder is refused, naming its runs."""
    from compass_monitor.cli import main

    assert main(["replay", str(stored.parent)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a run store" in err and str(stored) in err and "tui" in err
    assert main(["replay", str(tmp_path / "nothing")]) == 2
    assert "is not a run store" in capsys.readouterr().err
