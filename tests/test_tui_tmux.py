"""The app in a real terminal: tests/tui_tmux_check.sh under tmux at 120x40, 80x24, under NO_COLOR and TERM=dumb.

Skipped, with the reason, without tmux.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("textual")

SCRIPT = Path(__file__).with_name("tui_tmux_check.sh")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed: apt-get install -y tmux to run the real-terminal check")
@pytest.mark.parametrize(
    "cols, rows, extra",
    [(120, 40, {}), (80, 24, {}), (100, 30, {"NO_COLOR": "1"}), (80, 24, {"TERM": "dumb"})],
    ids=["120x40", "80x24", "NO_COLOR", "TERM=dumb"],
)
def test_app_shows_the_stored_numbers_in_tmux(cols, rows, extra):
    import compass_monitor

    env = {"PYTHONPATH": str(Path(compass_monitor.__file__).parents[1]), "PATH": "/usr/bin:/bin:/usr/local/bin",
           "TERM": "xterm-256color", "COLS": str(cols), "ROWS": str(rows), **extra}
    result = subprocess.run(["bash", str(SCRIPT), sys.executable], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK")
