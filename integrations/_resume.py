"""Creating a monitor, or continuing one from a framework checkpoint (shared by the adapters)."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig

__all__ = ["ResumeError", "core_supports_resume", "create_or_resume", "monitor_state", "select_groups"]

log = logging.getLogger(__name__)


try:  # the core's error when it refuses a resume
    from compass_monitor.store.schema import ResumeError
except ImportError:  # pragma: no cover - a core without resume

    class ResumeError(RuntimeError):  # type: ignore[no-redef]
        """A checkpoint's monitor state cannot be continued."""


def core_supports_resume() -> bool:
    """Whether the installed core can continue a run store (``CompassMonitor(..., resume=True)``)."""
    return hasattr(CompassMonitor, "state_dict") and "resume" in inspect.signature(CompassMonitor.__init__).parameters


def monitor_state(monitor: CompassMonitor) -> dict[str, Any]:
    """The monitor's checkpoint state (small, JSON-serialisable).

    Waits for the store to commit every snapshot taken so far, so that the
    checkpoint and the store agree on what was measured up to its step.
    """
    if hasattr(monitor, "flush") and monitor.enabled:
        monitor.flush()
    if hasattr(monitor, "state_dict"):
        return monitor.state_dict()
    return {"step": monitor.step, "last_snapshot_step": monitor.latest_step}


def create_or_resume(
    model: nn.Module,
    run_dir: str | os.PathLike[str],
    *,
    config: MonitorConfig,
    run_name: str | None,
    metadata: dict[str, Any],
    state: dict[str, Any] | None,
) -> CompassMonitor:
    """A new monitor (base = the model's weights now), or, with ``state``, the checkpointed run continued.

    Continuing reloads W0 from the store (the model holds the checkpoint's
    weights, not W0), drops the store's snapshots after the checkpoint's step
    (the resumed training redoes those steps) and counts on from that step.
    """
    if state is None:
        return CompassMonitor(model, run_dir, config=config, run_name=run_name, metadata=metadata)
    if not core_supports_resume():
        raise ResumeError("this compass-monitor core cannot continue a run store from a checkpoint")
    return CompassMonitor(
        model, run_dir, config=config, run_name=run_name, metadata=metadata, resume=True, resume_step=int(state["step"])
    )


def select_groups(scalars: dict[str, float], groups: Sequence[str] | None) -> dict[str, float]:
    """The scalars of the named groups (``{prefix}/{group}/{name}`` keys); all of them for None."""
    if groups is None:
        return scalars
    return {key: value for key, value in scalars.items() if key.rsplit("/", 2)[-2] in groups}
