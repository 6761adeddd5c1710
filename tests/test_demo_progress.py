"""The demo says what it does at least every few seconds: a line per GRPO step, and a line when it is quiet."""

from __future__ import annotations

import io

import pytest

from compass_monitor.demo.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_quiet_phases_get_a_line_every_period_and_steps_get_theirs():
    clock, out = Clock(), io.StringIO()
    progress = Progress(total_steps=30, every=10.0, stream=out, clock=clock)
    progress.phase("loading the model")
    clock.now += 9.9
    progress.tick()
    assert out.getvalue().count("\n") == 1  # not yet: 9.9 s of silence
    clock.now += 0.1
    progress.tick()
    assert out.getvalue().splitlines()[-1] == "demo: loading the model... (10s)"
    progress.step(3, {"reward": 0.625, "eval_accuracy": 0.71}, 0.98765)
    assert out.getvalue().splitlines()[-1] == "demo: step 3/30: reward 0.625, eval accuracy 0.710, latest snapshot sparsity 0.9877 (10s)"
    clock.now += 5.0
    progress.tick()  # a step line 5 s ago: quiet for less than the period
    assert out.getvalue().count("\n") == 3
    clock.now += 5.0
    progress.tick()
    assert out.getvalue().splitlines()[-1] == "demo: training, step 3/30 done... (20s)"
    progress.step(4, {"reward": 0.5}, None)
    assert out.getvalue().splitlines()[-1] == "demo: step 4/30: reward 0.500, no snapshot yet (20s)"


def test_the_thread_speaks_while_the_caller_is_busy():
    import time

    out = io.StringIO()
    with Progress(total_steps=1, every=0.2, stream=out) as progress:
        progress.phase("busy")
        time.sleep(1.0)  # the caller holds no lock: the daemon thread prints
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("demo: busy...") and len(lines) >= 3, lines
    with pytest.raises(ValueError, match="every must be > 0"):
        Progress(total_steps=1, every=0)


def test_the_live_demo_shows_its_latest_line_while_the_model_loads(tmp_path):
    """With a terminal the TUI said "runs/demo does not exist (yet)" for a minute: it shows the child's progress."""
    import asyncio

    pytest.importorskip("textual")
    from compass_monitor.demo.live import last_line
    from compass_monitor.tui.app import CompassApp
    from tui_helpers import text_of, wait_for

    log = tmp_path / "demo.log"
    assert last_line(log) == ""  # not written yet
    log.write_text("demo: loading torch, transformers and the model (all-MiniLM-L6-v2)... (0s)\n\n")
    assert last_line(log) == "demo: loading torch, transformers and the model (all-MiniLM-L6-v2)... (0s)"

    def waiting() -> str:
        return f"the demo is loading the model... {last_line(log).removeprefix('demo: ')}"

    async def main() -> None:
        async with CompassApp(tmp_path / "runs" / "demo", waiting=waiting).run_test(size=(100, 24)) as pilot:
            screen = pilot.app.screen
            await wait_for(pilot, lambda: "loading the model" in text_of(screen, "#runs-message"), what="the waiting line")
            assert "does not exist" not in text_of(screen, "#runs-message")
            log.write_text("demo: capturing the base weights and their principal and low-magnitude masks... (12s)\n")
            await wait_for(pilot, lambda: "capturing the base weights" in text_of(screen, "#runs-message"), what="the next line")

    asyncio.run(main())
