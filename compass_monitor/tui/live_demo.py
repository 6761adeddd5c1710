"""``make demo`` in a terminal: train in a child process, watch it in the TUI, then print the summary.

The child runs the plain demo (``run_demo(tui=False)``) with its output going to
``<run_dir>.log``; the TUI follows the run while it trains and stays open after
training ends, until the user presses ``q``. Then this waits for the child (if
the user quit early) and prints the child's output: the same text that the demo
prints without a terminal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["demo_with_tui"]


def demo_with_tui(*, run_dir: str, steps: int, every_n_steps: int, seed: int) -> int | None:
    """Run the demo with the TUI. Returns the exit code, or None if the TUI cannot run here (no Textual)."""
    try:
        from .launch import run_tui
    except ImportError:
        return None
    from ..demo import _clear_previous_demo

    path = Path(run_dir)
    _clear_previous_demo(path)  # so the TUI never shows an earlier demo run while the new one starts
    path.parent.mkdir(parents=True, exist_ok=True)
    log_path = path.with_name(path.name + ".log")
    code = (
        "import sys; from compass_monitor.demo import run_demo; "
        f"sys.exit(run_demo(run_dir={str(path)!r}, steps={steps}, every_n_steps={every_n_steps}, seed={seed}, tui=False))"
    )
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        run_tui(path)
        if child.poll() is None:
            print(f"demo: training goes on in process {child.pid}; waiting for it to finish (Ctrl-C stops it)...", flush=True)
        code = child.wait()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        print("demo: stopped", flush=True)
        return 130
    print(log_path.read_text(encoding="utf-8"), end="", flush=True)
    return code
