"""``make demo`` in a terminal: train in a child process, watch it in the TUI, then print the summary.

The child runs the plain demo (``run_demo(tui=False)``) with its output going to
``<run_dir>.log``; the TUI follows the run while it trains (showing the child's
latest progress line until the run store exists) and stays open after training
ends, until the user presses ``q``. Then this waits for the child (if the user
quit early) and prints the child's output: the same text that the demo prints
without a terminal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .run_dir import clear_previous_demo

__all__ = ["demo_with_tui", "last_line"]


def last_line(log_path: Path, *, limit: int = 4096) -> str:
    """The last non-empty line of the child's log ('' if there is none yet)."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def demo_with_tui(*, run_dir: str, steps: int, every_n_steps: int, seed: int) -> int | None:
    """Run the demo with the TUI. Returns the exit code, or None if the TUI cannot run here (no Textual)."""
    try:
        import textual  # noqa: F401  (only to know whether the TUI can run)
    except ImportError:
        return None
    from compass_monitor.tui.launch import run_tui

    path = Path(run_dir)
    clear_previous_demo(path)  # so the TUI never shows an earlier demo run while the new one starts
    path.parent.mkdir(parents=True, exist_ok=True)
    log_path = path.with_name(path.name + ".log")
    code = (
        "import sys; from compass_monitor.demo import run_demo; "
        f"sys.exit(run_demo(run_dir={str(path)!r}, steps={steps}, every_n_steps={every_n_steps}, seed={seed}, tui=False))"
    )
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def waiting() -> str:
        line = last_line(log_path)
        return f"the demo is loading the model... {line.removeprefix('demo: ')}" if line else "the demo is loading the model..."

    try:
        tui_code = run_tui(path, waiting=waiting)
        if child.poll() is None:
            print(f"demo: training goes on in process {child.pid}; waiting for it to finish (Ctrl-C stops it)...", flush=True)
        code = child.wait()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        print("demo: stopped", flush=True)
        return 130
    print(log_path.read_text(encoding="utf-8"), end="", flush=True)
    return code or tui_code
