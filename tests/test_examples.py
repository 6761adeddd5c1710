"""The README's example commands run as written, from the source tree, and leave a finished store.

The commands are read from the README's examples block, so a renamed script or a changed
argument list fails here rather than on a newcomer's machine (issue 16).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"^\.venv/bin/python (examples/\S+\.py) (\S+)", re.MULTILINE)


def readme_examples() -> list[tuple[str, str]]:
    """(script, run-dir argument) for every ``.venv/bin/python examples/...`` line of the README."""
    return COMMAND.findall((ROOT / "README.md").read_text())


def test_readme_lists_every_example():
    listed = {script for script, _ in readme_examples()}
    present = {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")}
    # verl_cpu.py runs in the verl environment (.venv-verl/bin/python), tested by test_integration_verl.py
    assert listed == present - {"examples/verl_cpu.py"}
    assert ".venv-verl/bin/python examples/verl_cpu.py runs/verl" in (ROOT / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("script,run_arg", readme_examples())
def test_example_runs_as_the_readme_says(tmp_path, script, run_arg):
    from compass_monitor import open_run

    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPASS_MONITOR_")}
    # the README's relative run folder, resolved in a scratch working directory
    done = subprocess.run([sys.executable, str(ROOT / script), run_arg], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = subprocess.run([sys.executable, "-m", "compass_monitor.cli", "summary", run_arg], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert "update sparsity" in summary.stdout
    run = open_run(tmp_path / run_arg)
    assert run.status == "finished"
    assert len(run.steps) >= 2
    assert (run.count("changed") > 0).any()  # the example trains: some bf16 weight changed
