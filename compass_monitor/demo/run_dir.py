"""The demo's run directory: an earlier demo run there is replaced, anything else is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

from compass_monitor.store import NotARunError, open_run

__all__ = ["DEMO_TAG", "clear_previous_demo"]

#: ``metadata["source"]`` of every run the demo writes
DEMO_TAG = "compass-monitor demo"


def clear_previous_demo(run_dir: Path) -> None:
    """Remove an earlier demo run at ``run_dir``.

    Raises:
        NotARunError: ``run_dir`` exists and is not an empty folder or a run that the demo wrote.
    """
    if not run_dir.exists():
        return
    try:
        previous = open_run(run_dir)
    except NotARunError:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            return
        raise NotARunError(f"{run_dir} exists and is not a demo run; pass --run-dir with a new directory") from None
    if previous.attrs.get("metadata", {}).get("source") != DEMO_TAG:
        raise NotARunError(f"{run_dir} holds a run that the demo did not write; pass --run-dir with a new directory")
    shutil.rmtree(run_dir)
