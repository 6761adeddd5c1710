"""Post hoc: a base and a series of checkpoints become an ordinary run store, one snapshot per checkpoint.

The driver checks the whole series from the headers first (nothing is
written for a series that does not fit), creates a monitor whose base is the
base checkpoint, then points the lazily loaded shards at each checkpoint in
turn and takes one snapshot at its training step. The store is the one a live
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
from .series import TensorSource, check_series, open_checkpoint

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


def _monitor(specs: list[ParamSpec], cursor: CheckpointCursor, run_dir: Path, config: MonitorConfig, *, run_name: str | None, metadata: dict[str, Any], model_class: str) -> CompassMonitor:
    """A monitor over the series' lazily loaded layout; its base is read now, from the cursor's checkpoint."""
    layout = build_layout(specs, cursor, facts={"source": "checkpoints", "base": str(cursor.source.path)})
    return CompassMonitor.from_layout(layout, run_dir, config=config, run_name=run_name, metadata=metadata, model_class=model_class)


#: Below this update sparsity at the first checkpoint the base is probably not the run's base:
#: unrelated bf16 weights differ almost everywhere, a fine-tune leaves many unchanged.
UNRELATED_SPARSITY = 0.01


def _warn_if_unrelated(monitor: CompassMonitor, base: Path, ref: CheckpointRef) -> None:
    monitor.flush()
    sparsity = monitor.latest_scalars().get("compass/all_linear/sparsity")
    if sparsity is not None and sparsity < UNRELATED_SPARSITY:
        log.warning(
            "compass-monitor diff: %.2f%% of the linear weights of %s (step %d) differ from the base %s: is that the model "
            "these checkpoints were trained from? (unrelated weights differ almost everywhere)",
            100 * (1 - sparsity), ref.path, ref.step, base,
        )


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

    Raises:
        CheckpointError: a checkpoint that cannot be read or does not fit the base (nothing written).
        StoreExistsError: ``run_dir`` holds a run or other files.
        KeyboardInterrupt: Ctrl-C; the store keeps every committed snapshot.
    """
    config = config or MonitorConfig(snapshot_on_close=False)
    if not checkpoints:
        raise CheckpointError("no checkpoints to compare with the base")
    base_source = open_checkpoint(base)
    opened: list[TensorSource] = [open_checkpoint(ref.path, base=base_source) for ref in checkpoints]
    specs = check_series(base_source, opened, config)
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
    cursor = CheckpointCursor(base_source, on_first_read=bar.advance, device=device)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    bar.start("base", len(specs))
    monitor = _monitor(specs, cursor, Path(run_dir), config, run_name=run_name, metadata=facts, model_class=(base_source.architectures or ("",))[0])
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
            if done == 1:
                _warn_if_unrelated(monitor, base_source.path, ref)
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
