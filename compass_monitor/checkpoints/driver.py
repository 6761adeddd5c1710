"""Post hoc: a base and a series of checkpoints become an ordinary run store, one snapshot per checkpoint.

The driver checks the whole series first, from the headers (``series``) and
from a sample of weights (``lineage``: each checkpoint must descend from the
base); nothing is written for a series that does not fit. It then creates
a monitor whose base is the base checkpoint, points the lazily loaded shards
at each checkpoint in turn and takes one snapshot at its training step. The store is the one a live
monitor attached to the same run would have written at those steps (same
probe, same writer), so ``summary``, ``inspect``, ``tui``, ``replay`` and the
report read it like a live run.

Ctrl-C between or during snapshots stops the driver: every snapshot already
handed to the writer is committed, the store is marked ``disabled`` with the
reason, and the KeyboardInterrupt propagates.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MonitorConfig
from ..monitor import CompassMonitor
from ..selection import ParamSpec
from .discovery import CheckpointRef
from .errors import CheckpointError
from .layout import CheckpointCursor, build_layout
from .lineage import check_lineage
from .series import TensorSource, check_series, open_checkpoint
from .views import ViewPlan

__all__ = ["DiffResult", "diff_checkpoints"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffResult:
    """What :func:`diff_checkpoints` wrote.

    Attributes:
        run_dir: the run store.
        steps: the snapshot steps, one per checkpoint.
        specs: the monitored matrices, in store order.
        seconds: wall time of the base capture and of each snapshot.
    """

    run_dir: Path
    steps: list[int]
    specs: list[ParamSpec]
    seconds: dict[str, float]


class _Progress:
    """One tqdm bar per phase on a terminal (with ETA); log lines per checkpoint otherwise."""

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None

    def start(self, phase: str, total: int) -> None:
        self.close()
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=phase, unit="matrix", leave=True, dynamic_ncols=True)

    def advance(self, name: str) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _monitor(plan: ViewPlan, cursor: CheckpointCursor, run_dir: Path, config: MonitorConfig, *, run_name: str | None, metadata: dict[str, Any],
             model_class: str, hold_base: bool) -> CompassMonitor:
    """A monitor over the series' lazily loaded layout; its base is read now, from the cursor's checkpoint.

    Unless ``hold_base``, a second cursor stays on the base: the probe rereads W0 from it instead of holding it.
    """
    base = None if hold_base else CheckpointCursor(cursor.source, views=cursor.views, device=cursor.device)
    layout = build_layout(plan.specs, cursor, base=base, facts={"source": "checkpoints", "base": str(cursor.source.path), **plan.facts})
    return CompassMonitor.from_layout(layout, run_dir, config=config, run_name=run_name, metadata=metadata, model_class=model_class)


def diff_checkpoints(
    base: str | Path,
    checkpoints: list[CheckpointRef],
    run_dir: str | Path,
    *,
    config: MonitorConfig | None = None,
    run_name: str | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool | None = None,
    device: str = "auto",
    allow_unrelated_base: bool = False,
    hold_base: bool = False,
) -> DiffResult:
    """Write a run store with one snapshot per checkpoint, measured against ``base``.

    Args:
        base: the base model (folder, ``.safetensors`` file, or a model id in the local HF cache).
        checkpoints: the checkpoints with their steps (``discovery.resolve_steps``), in step order.
        run_dir: a new or empty folder for the run store.
        config: what to measure (``every_n_steps`` is only recorded; the snapshot steps are the checkpoints').
        run_name: the run's label (default: the folder name).
        metadata: facts to record; the base and checkpoint paths are added.
        progress: a progress bar (True), log lines (False), or decide from the terminal (None).
        device: where the probe runs: ``cuda`` (principal masks and spectra are the costly part),
            ``cpu``, or ``auto`` (cuda when available).
        allow_unrelated_base: skip the test that every checkpoint descends from ``base``
            (``lineage``: median weight cosine >= 0.5), to compare two unrelated models on purpose.
        hold_base: keep W0 (2 bytes per weight) and the masks (4 bits per weight) in memory, as a
            live monitor does. By default W0 is reread from the base checkpoint for every snapshot
            and the masks wait in a spill file beside ``run_dir``: peak memory is then set by the
            largest matrix, not the model (``bench/bench_posthoc_memory.py``), for one more read of
            the base per checkpoint.

    Raises:
        CheckpointError: a checkpoint that cannot be read or does not fit the base (nothing written).
        BaseMismatchError: a checkpoint that was not trained from ``base`` (nothing written).
        StoreExistsError: ``run_dir`` holds a run or other files.
        KeyboardInterrupt: Ctrl-C; the store keeps every committed snapshot.
    """
    config = config or MonitorConfig(snapshot_on_close=False)
    if not checkpoints:
        raise CheckpointError("no checkpoints to compare with the base")
    base_source = open_checkpoint(base)
    opened: list[TensorSource] = [open_checkpoint(ref.path, base=base_source) for ref in checkpoints]
    plan = check_series(base_source, opened, config)
    specs = plan.specs
    for ref, source in zip(checkpoints, opened):
        if allow_unrelated_base:
            break
        closeness = check_lineage(base_source, source, plan)
        if closeness is not None:
            log.debug("compass-monitor diff: %s descends from the base (median weight cosine %.4f)", ref.path, closeness)
    for source in opened:
        source.close()
    facts = {
        "posthoc": {
            "base": str(base_source.path),
            "checkpoints": [{"path": str(ref.path), "step": ref.step, "step_from": ref.step_from} for ref in checkpoints],
        },
        **(metadata or {}),
    }
    bar = _Progress(enabled=progress)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cursor = CheckpointCursor(base_source, views=plan.views, on_first_read=bar.advance, device=device)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    bar.start("base", len(specs))
    monitor = _monitor(plan, cursor, Path(run_dir), config, run_name=run_name, metadata=facts, model_class=(base_source.architectures or ("",))[0],
                       hold_base=hold_base)
    seconds["base"] = time.perf_counter() - began
    if not bar.tty:  # on a terminal the bar says it
        log.info("compass-monitor diff: base %s captured: %d matrices in %.1fs", base_source.path, len(specs), seconds["base"])
    done = 0
    try:
        for i, ref in enumerate(checkpoints):
            t0 = time.perf_counter()
            bar.start(f"step {ref.step} ({i + 1}/{len(checkpoints)})", len(specs))
            source = open_checkpoint(ref.path, base=base_source)
            cursor.move_to(source)
            monitor.snapshot(ref.step)
            source.close()
            if not monitor.enabled:
                raise CheckpointError(f"the snapshot of {ref.path} failed: {monitor.disabled_reason}; the store keeps the {done} snapshots before it")
            done += 1
            seconds[f"step {ref.step}"] = elapsed = time.perf_counter() - t0
            per = (time.perf_counter() - began - seconds["base"]) / done
            if not bar.tty:
                log.info(
                    "compass-monitor diff: checkpoint %d/%d (step %d) measured in %.1fs; about %.0fs left",
                    done, len(checkpoints), ref.step, elapsed, per * (len(checkpoints) - done),
                )
        bar.close()
        monitor.close()
    except BaseException as exc:  # Ctrl-C or a checkpoint that fails: keep what is committed, then re-raise
        bar.close()
        what = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"stopped ({type(exc).__name__}: {exc})"
        if monitor.enabled:
            last = checkpoints[done - 1].step if done else 0
            monitor.writer.abort("disabled", reason=f"{what} after {done} of {len(checkpoints)} checkpoints", step=last)
        log.warning("compass-monitor diff: %s; %s keeps %d snapshot(s)", what, run_dir, monitor.writer.num_snapshots)
        raise
    if monitor.disabled_reason:
        raise CheckpointError(f"finishing the run store failed: {monitor.disabled_reason}")
    base_source.close()
    return DiffResult(run_dir=Path(os.fspath(run_dir)), steps=[r.step for r in checkpoints], specs=list(monitor.specs), seconds=seconds)
