"""One selection drives every panel: after any burst of keys, the cursor, the header and the side panel (and the
drill-down's header and overlap table) all name the cursor's step and show that step's stored values.

The bug this holds: Down posted a cursor message carrying the old snapshot; Left, Left moved the cursor, then the
late message moved the header and side panel back (cursor on step 55, numbers of step 60).
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

pytest.importorskip("textual")

from textual import events

from compass_monitor import open_run
from compass_monitor.aggregates import everything_linear, group_stats
from compass_monitor.tui.app import CompassApp
from compass_monitor.tui.data import row_label
from compass_monitor.tui.screens.matrix import MatrixScreen
from compass_monitor.tui.screens.run import RunScreen
from synthetic_runs import write_synthetic_run
from tui_helpers import heatmap_text, text_of, wait_for

RUN_KEYS = ["up", "down", "left", "right", "left", "down", "home", "end", "shift+left", "shift+right", "pageup", "pagedown", "s", "f", "enter"]
MATRIX_KEYS = ["left", "right", "up", "down", "home", "end", "f", "escape"]


async def burst(pilot, keys: list[str]) -> None:
    """Deliver ``keys`` at once, as a terminal delivers fast typing (pilot.press waits for idle after each key)."""
    driver = pilot.app._driver
    for key in keys:
        event = events.Key(key, key if len(key) == 1 else None)
        event.set_sender(pilot.app)
        driver.send_message(event)
    await pilot.pause()
    await pilot.pause()


def expected(run, t: int, index: int) -> dict[str, str]:
    """What the panels must show for snapshot ``t`` and matrix ``index``, from the store (not from the TUI)."""
    changed = run.count("changed")[t, index] / run.params[index].numel
    sparsity = group_stats(run, everything_linear)["all linear"].sparsity[t]
    return {"step": f"step {int(run.steps[t])} ({t + 1}/{run.num_snapshots})", "changed": f"{changed:.3f}",
            "sparsity": f"global sparsity {sparsity:.3f}", "name": run.params[index].name}


def check_run_screen(screen: RunScreen, run) -> None:
    hm = screen.heatmap
    t, row = hm.cursor_col, hm.cursor_row  # the cursor as drawn
    index = screen.order[row]
    want = expected(run, t, index)
    header, details, lines = text_of(screen, "#run-header"), text_of(screen, "#details"), heatmap_text(hm)
    assert want["step"] in header and want["sparsity"] in header, (header, want)
    assert details.startswith(want["name"]) and want["step"] in details, (details, want)
    assert f"changed |M|/n  {want['changed']}" in details, (details, want)
    assert lines[0].index("▼") == hm.label_width + (t - hm._col_offset) * hm.cell_width  # the marker over the cursor
    assert lines[1 + row - hm._row_offset].startswith(row_label(run.params[index]))  # the cursor's row is on screen


def check_matrix_screen(matrix: MatrixScreen, run) -> None:
    t, index = matrix.t, matrix.index
    want = expected(run, t, index)
    header = text_of(matrix, "#matrix-header")
    assert want["name"] in header and want["step"] in header and f"changed {want['changed']}" in header, (header, want)
    assert f"at step {int(run.steps[t])}:" in text_of(matrix, "#overlap-table")


@pytest.mark.parametrize("seed", [0, 1])
def test_random_key_bursts_never_show_another_snapshots_numbers(tmp_path, seed):
    path = write_synthetic_run(tmp_path / "run", snapshots=12, seed=seed)
    run = open_run(path)
    rng = random.Random(seed)

    async def body(pilot):
        screen = pilot.app.screen
        await wait_for(pilot, lambda: screen.view is not None and screen.view.null is not None, what="the run")
        await burst(pilot, ["down", "left", "left"])  # the reported sequence
        check_run_screen(screen, run)
        for _ in range(40):
            on_matrix = isinstance(pilot.app.screen, MatrixScreen)
            keys = [rng.choice(MATRIX_KEYS[:-1] if on_matrix else RUN_KEYS[:-1]) for _ in range(rng.randint(1, 6))]
            if rng.random() < 0.2:
                keys.append("escape" if on_matrix else "enter")
            await burst(pilot, keys)
            current = pilot.app.screen
            if isinstance(current, MatrixScreen):
                check_matrix_screen(current, run)
            else:
                assert current is screen, f"unexpected screen {current} after {keys}"
                check_run_screen(screen, run)

    app = CompassApp(path)

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await body(pilot)

    asyncio.run(main())


def test_a_click_selects_the_clicked_cell(tmp_path):
    path = write_synthetic_run(tmp_path / "run", snapshots=8, seed=3)
    run = open_run(path)

    async def main() -> None:
        async with CompassApp(path).run_test(size=(120, 40)) as pilot:
            screen = pilot.app.screen
            await wait_for(pilot, lambda: screen.view is not None, what="the run")
            await pilot.pause()
            hm = screen.heatmap
            await pilot.click("#heatmap", offset=(hm.label_width + 2 * hm.cell_width, 1 + 3))
            await pilot.pause()
            assert (hm.cursor_row, hm.cursor_col) == (3, 2) and not screen.timeline.following
            check_run_screen(screen, run)

    asyncio.run(main())
