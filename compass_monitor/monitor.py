"""CompassMonitor: snapshots bf16 update masks every N real optimizer steps.

Usage (plain PyTorch, see ``compass_monitor.integrations.pytorch``)::

    monitor = CompassMonitor(model, "runs/my-run", config=MonitorConfig(every_n_steps=10))
    for batch in loader:
        ...; optimizer.step(); monitor.on_optimizer_step()
    monitor.close()

The core knows no framework: adapters decide when a real optimizer step
happened and call :meth:`CompassMonitor.on_optimizer_step`.

One monitor for every layout: it drives one per-rank probe
(``compass_monitor.probe``) over the shards its rank holds. A plain model in
one process is one rank holding whole matrices; a model sharded across
processes (FSDP1, FSDP2 / DTensor ``Shard(0)``, HSDP) is monitored by one
instance per rank, created and driven on **every** rank with the same
arguments (docs/sharding.md). Rank 0 writes the store; the other ranks get a
do-nothing sink (``sinks.NullSink``). Every decision that changes which
collectives run next is taken from values every rank holds after the same
collective: a failure on any rank (measuring, or rank 0's store writer) is
reported through the next snapshot's all-reduce, and every rank disables
itself at the same snapshot.

The monitor never takes a training run down: once constructed, any failure in
it (disk full, a resized parameter, a store error) is logged, the run store is
marked ``disabled`` if possible, and the monitor detaches itself. Errors in the
constructor (bad configuration, no matching parameters, an occupied store
path) are raised, because they happen before training starts and say what to fix.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .aggregates import aggregate_counts, by_module_type, everything_linear, scalars, spectral_scalars
from .collectives import Comm
from .config import MonitorConfig
from .precision_null import class_attributes, null_overlaps
from .probe import ShardProbe
from .run_attributes import model_class_of, run_attributes
from .resume import ResumePoint, agree, agreed_config, read_resume_point, restore_probe, rewind_point
from .sharding import ShardLayout, sharding_kind
from .sinks import NullSink
from .spectral_tracker import SpectralTracker
from .state_spill import spill_directory
from .store import schema
from .store.async_writer import AsyncWriter
from .store.writer import RunWriter, SnapshotRecord, check_creatable

__all__ = ["CompassMonitor", "SnapshotFailed"]

log = logging.getLogger(__name__)

class SnapshotFailed(RuntimeError):
    """A snapshot failed on some rank (the message says which and why); every rank disables itself."""


class CompassMonitor:
    """Watches where a model's bf16 weights change, and writes it to a run store.

    At construction it selects the parameters (2-D weights of linear layers by
    default), takes the base W0 (bf16, on the parameters' device), computes the
    principal and low-magnitude masks once, and creates the run store. Each
    snapshot stores, per matrix, the packed changed mask, the row and column
    change counts, and the overlap counts with the reference masks; with the
    precision null of each overlap.

    Args:
        model: the module whose parameters are monitored (its current weights are the base).
        run_dir: a new or empty directory for the run store.
        config: what to measure and how often.
        run_name: a label for the run (default: the directory name).
        metadata: JSON-serialisable facts to record (model id, task, seed, ...).
        resume: continue the run store at ``run_dir`` instead of creating one.
            The base W0 is reloaded from the store (its bf16 codes, checked
            against the stored fingerprint), never taken from ``model``; the
            parameter layout and the measurement settings must match; the
            model must descend from the stored base (its weights equal W0
            almost everywhere the kept snapshot says they had not changed).
            Snapshots after ``resume_step`` are dropped (recorded in the
            store's history) and new ones are appended.
        resume_step: the optimizer step the training resumes from (the
            checkpoint's step); default: the last committed snapshot's step.
            The monitor's step counter continues from it.
        group: the process group a sharded model spans (default: the world).
        optimizer: the training optimizer, if known: parameters in none of its
            param groups count as frozen (left out unless ``include_frozen``).

    Raises:
        ConfigError: an invalid configuration.
        SelectionError: no parameter matches the configuration.
        ShardingError: a parameter is sharded in a way the monitor cannot read.
        StoreExistsError: ``run_dir`` holds a run or other files.
        ResumeError: (``resume=True``) the store cannot be continued with this
            model or configuration; the message names what differs.
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | os.PathLike[str],
        *,
        config: MonitorConfig | None = None,
        run_name: str | None = None,
        metadata: dict[str, Any] | None = None,
        resume: bool = False,
        resume_step: int | None = None,
        group: Any = None,
        optimizer: Any = None,
    ) -> None:
        # A model none of whose parameters is sharded (one device, DDP, a replica) is this process's alone:
        # no collective, even in an initialized world where only rank 0 creates a monitor.
        comm = Comm(group, local=sharding_kind(model) == "plain")
        if resume:
            config = agreed_config(comm, run_dir, config)
        config = config or MonitorConfig()
        probe = ShardProbe.from_model(model, config, group=group, comm=comm, optimizer=optimizer)
        self._start(probe, run_dir, config, run_name=run_name, metadata=metadata, model_class=model_class_of(model), resume=resume, resume_step=resume_step)

    @classmethod
    def from_layout(
        cls,
        layout: ShardLayout,
        run_dir: str | os.PathLike[str],
        *,
        config: MonitorConfig | None = None,
        run_name: str | None = None,
        metadata: dict[str, Any] | None = None,
        model_class: str = "",
        resume: bool = False,
        resume_step: int | None = None,
    ) -> "CompassMonitor":
        """A monitor over any :class:`~compass_monitor.sharding.ShardLayout` (same arguments as the constructor).

        Each shard's ``values()`` is the only way the monitor reads weights, so a
        layout may present lazily loaded tensors (post-hoc checkpoints) or views of
        a model that discovery does not know. Take snapshots with :meth:`snapshot`.
        """
        comm = Comm(layout.group, local=layout.kind == "plain")
        if resume:
            config = agreed_config(comm, run_dir, config)
        config = config or MonitorConfig()
        monitor = cls.__new__(cls)
        monitor._start(
            ShardProbe(layout, config, comm=comm), run_dir, config, run_name=run_name, metadata=metadata, model_class=model_class, resume=resume, resume_step=resume_step
        )
        return monitor

    def _start(
        self,
        probe: ShardProbe,
        run_dir: str | os.PathLike[str],
        config: MonitorConfig,
        *,
        run_name: str | None,
        metadata: dict[str, Any] | None,
        model_class: str,
        resume: bool,
        resume_step: int | None,
    ) -> None:
        self.config = config
        self.probe = probe
        self.comm = probe.comm
        self.specs = probe.specs
        self._hooks: list[Any] = []
        self.step = 0
        self._last_snapshot_step: int | None = None
        self._warned: dict[str, int] = {}
        self._latest: tuple[int, np.ndarray, np.ndarray] | None = None
        self.enabled = True
        self.disabled_reason: str | None = None
        self._snapshots_taken = 0
        self._spectral: SpectralTracker | None = None
        self._latest_spectral: np.ndarray | None = None  # (P, F) of the latest spectral snapshot
        if resume:
            self._resume(run_dir, resume_step=resume_step, run_name=run_name, metadata=metadata)
        else:
            self._create(run_dir, run_name=run_name, metadata=metadata, model_class=model_class)
        if config.spectral_every:
            self._spectral = SpectralTracker(probe, config)

    # -- creation and resume ---------------------------------------------------------
    def _create(self, run_dir: str | os.PathLike[str], *, run_name: str | None, metadata: dict[str, Any] | None, model_class: str) -> None:
        agree(self.comm, lambda: check_creatable(Path(run_dir)))  # fail before the base's cost, as create() would
        base = self.probe.capture_base(want_codes=self.config.store_base, spill_dir=spill_directory(run_dir))
        self._class_counts = base.class_counts
        attributes = run_attributes(
            run_dir, run_name=run_name, metadata=metadata, model_class=model_class, config=self.config, world_size=self.comm.world_size, layout=self.probe.layout
        )
        store = agree(
            self.comm,
            lambda: RunWriter.create(run_dir, params=self.specs, attributes=attributes, key_interval=self.config.key_interval),
            share=False,
        )
        if store is None:
            self.writer: AsyncWriter | NullSink = NullSink(run_dir)
            return
        self._warn_base_nonfinite(base.nonfinite)
        self.writer = self._start_writer(store)
        # The base goes through the writer thread too (compressing W0 takes a while).
        self.writer.submit_base(
            fingerprints=base.fingerprints,
            class_counts=base.class_counts,
            class_attributes=class_attributes(base.class_counts),
            reference_packed=base.reference_packed,
            base_codes=base.base_codes,
        )
        log.info(
            "compass-monitor: watching %d matrices (%d weights) on %d rank(s) (%s) -> %s",
            len(self.specs),
            self.num_weights,
            self.comm.world_size,
            self.probe.layout.kind,
            run_dir,
        )

    def _start_writer(self, store: RunWriter) -> AsyncWriter:
        return AsyncWriter(store, queue_size=self.config.writer_queue, when_full=self.config.when_queue_full)

    def _resume(self, run_dir: str | os.PathLike[str], *, resume_step: int | None, run_name: str | None, metadata: dict[str, Any] | None) -> None:
        def take_over() -> RunWriter:
            AsyncWriter.release(run_dir)  # a monitor of this process that was never closed stops writing first
            return RunWriter.open_existing(run_dir, key_interval=self.config.key_interval)

        # The writer lock before reading what to keep: no other process can resume or append meanwhile.
        store = agree(self.comm, take_over, share=False)
        try:
            run, point = read_resume_point(self.comm, run_dir, self.specs, resume_step)
            restore_probe(self.probe, run, point, run_dir)

            def resume_store() -> None:
                event: dict[str, Any] = {"step": point.step, "pid": os.getpid(), "host": socket.gethostname(), "world_size": self.comm.world_size}
                if run_name or metadata:
                    event.update({"run_name": run_name, "metadata": metadata or {}})
                if point.gap is not None:
                    event["gap"] = list(point.gap)  # [last step the store saw, step resumed at]: trained unmonitored
                store.resume(point.keep, event=event)

            agree(self.comm, resume_store)
        except BaseException:
            if store is not None:
                store.release()
            raise
        self._apply(point)
        self.writer = self._start_writer(store) if store is not None else NullSink(run_dir)
        if store is not None:
            log.info("compass-monitor: resumed %s at step %d: kept %d snapshots, dropped %d", run_dir, point.step, point.keep, point.dropped)
            self._warn_gap(point, run_dir)

    def _apply(self, point: ResumePoint) -> None:
        """Step counter and latest scalars of a resume or rewind (agreed on every rank)."""
        self._class_counts = point.class_counts
        self.step = point.step
        self._last_snapshot_step = point.last_snapshot_step
        self._latest = point.latest
        self._snapshots_taken = point.keep  # the spectral cadence counts stored snapshots, across resumes

    def _warn_gap(self, point: ResumePoint, run_dir: Any) -> None:
        """One warning (rank 0) when training went on without the monitor between the store's last seen step and ``point.step``."""
        if point.gap is None or self.comm.rank != 0:
            return
        seen, step = point.gap
        due = point.unseen_from if point.unseen_from is not None else seen + 1
        unseen = f"steps {seen + 1}..{step}" if due == seen + 1 else f"steps {due}..{step} at least"
        against = f"step {point.last_snapshot_step}'s mask" if point.last_snapshot_step is not None else "the base W0"
        log.warning(
            "compass-monitor: run %s resumed at step %d, but the store last saw step %d: %s were not monitored; "
            "the first snapshot after the resume compares with %s, so its step-to-step flips span that gap "
            "(recorded in the store's history as gap [%d, %d])",
            run_dir, step, seen, unseen, against, seen, step,
        )

    def state_dict(self) -> dict[str, Any]:
        """Minimal state for a training checkpoint: the step counter and the last snapshot's step."""
        return {
            "step": self.step,
            "last_snapshot_step": self._last_snapshot_step,
            "run_dir": self.run_dir,
            "schema_version": schema.SCHEMA_VERSION,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`: rewind to its step. Never raises; call on every rank.

        Snapshots after the checkpoint's step are dropped from the store
        (recorded in its history); the step counter and the previous masks are
        restored from the store. Use with ``resume=True``.
        """
        if self.enabled:
            self._guarded(self._rewind, int(state["step"]))

    def _rewind(self, step: int) -> None:
        point = rewind_point(self.probe, self.writer, self.run_dir, step)
        self._apply(point)
        self._warn_gap(point, self.run_dir)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every snapshot taken so far is committed to the store. True if done in time."""
        return self.writer.flush(timeout)

    def _writer_failure(self) -> str:
        error = self.writer.error
        return f"the run-store writer failed ({self.writer.error_context}): {type(error).__name__}: {error}"

    # -- facts ----------------------------------------------------------------------
    @property
    def num_weights(self) -> int:
        return sum(spec.numel for spec in self.specs)

    @property
    def run_dir(self) -> str:
        return str(self.writer.path)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    # -- step counting ---------------------------------------------------------
    def own_hook(self, handle: Any) -> None:
        """Keep a hook handle (anything with ``remove()``) to remove on close or disable.

        Adapters register their framework hooks and hand the handles here.
        """
        self._hooks.append(handle)

    def on_optimizer_step(self) -> None:
        """Record that one optimizer step ran; snapshot if it is the N-th. Never raises; call on every rank.

        Adapters call this once per real optimizer step (for plain PyTorch,
        ``compass_monitor.integrations.pytorch.attach_optimizer`` does).
        """
        if not self.enabled:
            return
        self.step += 1
        if self.comm.world_size == 1 and self.writer.error is not None:
            # Alone, the writer's failure is known at once; under sharding it is agreed on at the next snapshot.
            self._guarded(self._raise, self._writer_failure())
            return
        if self.step % self.config.every_n_steps == 0:
            self._guarded(self._snapshot, self.step)

    def snapshot(self, step: int | None = None) -> None:
        """Take a snapshot now, labelled ``step`` (default: the current step count). Never raises; call on every rank."""
        if self.enabled:
            self._guarded(self._snapshot, self.step if step is None else step)

    @staticmethod
    def _raise(message: str) -> None:
        raise RuntimeError(message)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # the monitor must never take training down (Ctrl-C still propagates)
            log.debug("compass-monitor: the failure that disables the monitor", exc_info=True)
            self._disable(str(exc) if isinstance(exc, SnapshotFailed) else f"{type(exc).__name__}: {exc}")

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.disabled_reason = reason
        self._detach()
        # Writes what is still queued (if the writer is healthy), then marks the store.
        self.writer.abort("disabled", reason=reason, step=self.step)
        where = f" on rank {self.rank}" if self.world_size > 1 else ""
        kept = f"; the run store keeps the {self.writer.num_snapshots} committed snapshots" if self.probe.is_writer else ""
        log.error("compass-monitor: disabled at step %d%s: %s. Training continues%s.", self.step, where, reason, kept)

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- snapshot ----------------------------------------------------------------
    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        if self._last_snapshot_step == step:
            return
        writer_failed = self.writer.error is not None
        # Only the writer knows its queue; every rank learns the decision from the all-reduce.
        skip = not writer_failed and self.config.when_queue_full == "skip" and self.writer.full()
        if skip and self.world_size == 1:
            # Decided alone: skip before paying for the measurement. The next snapshot's
            # flips are then counted against the last stored mask.
            self.writer.note_gap(step)
            return
        self.probe.snapshot_step = step  # for the probe's messages
        snap = self.probe.measure() if not writer_failed else None
        counts, flags = self.probe.reduce(snap or _failed_snapshot(len(self.specs)), skip=skip, error=writer_failed)
        if flags["error"]:
            mine = snap.error if snap is not None else self._writer_failure()
            if mine and self.world_size > 1 and snap is None:
                mine = f"rank {self.rank}: {mine}"
            reasons = [r for r in self.comm.all_gather_object(mine) if r]
            raise SnapshotFailed("; ".join(reasons) or "a rank failed")
        if flags["skip"]:
            self.writer.note_gap(step)  # rank 0; every rank keeps its previous masks
            return
        pieces = self.probe.collect(snap)
        null = null_overlaps(self._class_counts, counts[:, 0])
        self._snapshots_taken += 1
        spectral = self._spectral.rows() if self._spectral is not None and self._spectral.due(self._snapshots_taken) else None
        if pieces is not None:
            rows, cols, packed = pieces
            record = SnapshotRecord(step=step, wall_time=time.time(), counts=counts, null_overlap=null, rows=rows, cols=cols, packed=packed,
                                  **(spectral.record_fields() if spectral is not None else {}))
            # A refusal here (the writer failed meanwhile) is agreed on at the next snapshot.
            self.writer.submit(record)
        self.probe.accept(snap)
        self._warn_nonfinite(counts[:, schema.COUNT_FIELDS.index("nonfinite")])
        self._last_snapshot_step = step
        self._latest = (step, counts, null)
        if spectral is not None:
            self._latest_spectral = spectral.fields

    def latest_scalars(self, *, prefix: str = "compass") -> dict[str, float]:
        """Scalars of the latest snapshot for a logger, ``{}`` before the first one (every rank holds them).

        Groups: ``all_linear`` (the global numbers), each module type (q, k, v,
        o, gate, up, down, ...) and each other monitored role. Keys and values
        are those that ``aggregates.scalars`` derives from the stored counts; with
        spectral diagnostics on, also ``aggregates.spectral_scalars`` of the latest
        spectral snapshot (every rank holds them).
        """
        if self._latest is None:
            return {}
        _, counts, null = self._latest
        mask_sizes = self._class_counts[:, 1:, :].sum(axis=2)
        out: dict[str, float] = {}
        for key in (everything_linear, by_module_type):
            stats = aggregate_counts(params=self.specs, counts=counts[None], null=null[None], mask_sizes=mask_sizes, key=key)
            out.update(scalars(stats, prefix=prefix))
            if self._latest_spectral is not None:
                out.update(spectral_scalars(self.specs, self._latest_spectral, key=key, prefix=prefix))
        return out

    @property
    def latest_step(self) -> int | None:
        """Optimizer step of the latest committed snapshot."""
        return None if self._latest is None else self._latest[0]

    def _warn_base_nonfinite(self, nonfinite: np.ndarray) -> None:
        for spec, bad in zip(self.specs, nonfinite):
            if bad:
                log.warning(
                    "compass-monitor: base of %s holds %d NaN/Inf values; they count as 0 in the reference "
                    "masks and any NaN in later weights counts as changed",
                    spec.name,
                    bad,
                )

    def _warn_nonfinite(self, nonfinite: np.ndarray) -> None:
        if not self.probe.is_writer:
            return
        for spec, bad in zip(self.specs, nonfinite):
            if bad and self._warned.get(spec.name, 0) < self.config.max_warnings_per_param:
                self._warned[spec.name] = self._warned.get(spec.name, 0) + 1
                log.warning("compass-monitor: %s holds %d NaN/Inf values at step %d (NaNs count as changed)", spec.name, bad, self.step)

    # -- end of run ----------------------------------------------------------------
    def close(self) -> None:
        """Take the last snapshot (if due), wait for the writer, finalize the store, detach. Never raises; call on every rank."""
        if not self.enabled:
            return
        if self.comm.world_size == 1 and self.writer.error is not None:
            self._guarded(self._raise, self._writer_failure())
            return
        if self.config.snapshot_on_close and self.step > 0 and self._last_snapshot_step != self.step:
            self.writer.flush()  # the last snapshot is never skipped for a full queue
            self._guarded(self._snapshot, self.step)
        elif self.step == 0 and self._last_snapshot_step is None and self.probe.is_writer:
            log.warning(
                "compass-monitor: closing %s with 0 snapshots: no optimizer step was counted since the base was taken. "
                "To record weights changed outside an optimizer (loaded, edited), call monitor.snapshot(step=N) before close().",
                self.run_dir,
            )
        if not self.enabled:
            return
        self._detach()
        self.enabled = False
        self._finish_store()

    def _finish_store(self) -> None:
        """Finalize the store as ``finished``; if that fails, log it and mark the store ``disabled``."""
        if self.writer.error is not None:
            reason = self._writer_failure()
            self.disabled_reason = reason
            self.writer.abort("disabled", reason=reason, step=self.step)
            log.error("compass-monitor: %s; the run store keeps the %d committed snapshots", reason, self.writer.num_snapshots)
            return
        self.writer.close("finished")
        self.probe.close()  # the spill file of a post-hoc probe (the writer has read all it needed)
        if self.writer.error is not None:
            reason = f"finalize failed ({self.writer.error_context}): {type(self.writer.error).__name__}: {self.writer.error}"
            self.disabled_reason = reason
            log.error("compass-monitor: %s; the run store keeps the %d committed snapshots", reason, self.writer.num_snapshots)
            try:
                self.writer.writer.mark("disabled", reason=reason)
            except Exception as exc:  # noqa: BLE001
                log.error("compass-monitor: could not mark the run store disabled: %s", exc)

    def __enter__(self) -> "CompassMonitor":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _failed_snapshot(num_matrices: int) -> Any:
    from .probe import LocalSnapshot

    return LocalSnapshot(counts=np.zeros((num_matrices, 6), np.int64))
