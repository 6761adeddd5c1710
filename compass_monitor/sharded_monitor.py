"""The monitor on sharded models: one instance per rank, one run store.

``CompassMonitor(model, ...)`` returns a :class:`ShardedMonitor` when the
model's parameters are sharded across processes (FSDP1, FSDP2 / DTensor);
create it on **every** rank, with the same arguments, after the model is
wrapped, and call ``on_optimizer_step`` / ``snapshot`` / ``close`` on every
rank (the adapters do). Each rank measures only its own shards
(``compass_monitor.distributed``); rank 0 writes the run store, which holds
exactly what a single process would have stored (its layout does not depend
on the number of ranks, so a run can resume on another world size).

Agreement: every decision that changes which collectives run next is taken
from values every rank holds after the same collective. A failure on any rank
(measuring, or rank 0's store writer) is reported through the next snapshot's
all-reduce, and every rank disables itself at the same snapshot. Skipping a
snapshot because the writer is behind (``when_queue_full="skip"``) is rank 0's
decision, sent in the same all-reduce; every rank then keeps its previous
masks, so flips are counted against the last stored snapshot, as in a single
process.

Spectral diagnostics (``spectral_every``) need whole matrices: at their own
cadence each matrix is gathered to rank 0 in turn (2 bytes per weight) and
measured there against its base decomposition, which rank 0 computed once the
same way; the store then equals a single process's.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import MonitorConfig
from .distributed import LocalSnapshot, ShardedCore
from .monitor import CompassMonitor, spectral_row
from .precision_null import null_overlaps
from .spectral import SpectralBase, spectral_base, spectral_drift_checked
from .store import schema
from .store.writer import RunWriter, SnapshotRecord

__all__ = ["ShardedMonitor"]

log = logging.getLogger(__name__)


class _RankWriter:
    """Stands in for the store writer on ranks that do not write (every call is a no-op)."""

    error: BaseException | None = None
    error_context = ""
    skipped = 0
    num_snapshots = 0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.writer = self

    def full(self) -> bool:
        return False

    def submit(self, record: Any) -> bool:
        return True

    def submit_base(self, **kwargs: Any) -> bool:
        return True

    def note_gap(self, step: int) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def call(self, fn: Any) -> None:
        return None

    def close(self, status: str = "finished", **event: Any) -> None:
        pass

    def abort(self, status: str = "disabled", **event: Any) -> None:
        pass

    def mark(self, status: str, **event: Any) -> None:
        pass


def _model_class(model: nn.Module) -> str:
    """The class of the model as the user built it (not FSDP's wrapper or FSDP2's dynamic subclass)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            return type(model.module).__name__
        if isinstance(model, FSDPModule):
            for cls in type(model).__mro__[1:]:
                if not issubclass(cls, FSDPModule):
                    return cls.__name__
    except ImportError:  # pragma: no cover
        pass
    return type(model).__name__


class ShardedMonitor(CompassMonitor):
    """:class:`CompassMonitor` for a model sharded across the ranks of a process group.

    Same arguments and store as :class:`CompassMonitor`, plus ``group`` (the
    process group the model is sharded over; default: the world). Created on
    every rank; constructor errors (bad configuration, unsupported layout, an
    occupied store path) are raised on every rank alike.
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
        optimizer: Any = None,  # frozen status under sharding comes from requires_grad alone
    ) -> None:
        from .distributed import Comm

        comm = Comm(group)
        if resume:
            from . import sharded_resume

            config = sharded_resume.agreed_config(comm, run_dir, config)
        self.config = config or MonitorConfig()
        self.core = ShardedCore.from_model(model, self.config, group=group, base_device=self.config.base_device)
        self.comm = self.core.comm
        self.specs = self.core.specs
        self._params: list[torch.Tensor] = []
        self._init_state()
        if resume:
            from . import sharded_resume

            sharded_resume.resume(self, run_dir, resume_step=resume_step, run_name=run_name, metadata=metadata)
            self._init_spectral()
            return

        store = None
        failure: tuple[str, str] | None = None
        if self.core.is_writer:
            attributes = self._store_attributes(
                run_dir, run_name, metadata, model_class=_model_class(model), world_size=self.comm.world_size, sharding=self.core.layout.kind,
                selection=self.core.layout.facts,
            )
            try:
                store = RunWriter.create(run_dir, params=self.specs, attributes=attributes, key_interval=self.config.key_interval)
            except Exception as exc:  # raised on every rank below
                failure = (type(exc).__name__, str(exc))
                error = exc
        outcome = self.comm.all_gather_object(failure)[0]
        if outcome is not None:
            if self.core.is_writer:
                raise error
            raise (schema.StoreExistsError if outcome[0] == "StoreExistsError" else schema.StoreError)(f"rank 0: {outcome[1]}")

        base = self.core.capture_base(want_codes=self.config.store_base)
        self._class_counts = base["class_counts"]
        self._warn_base_nonfinite(base["nonfinite"])
        if store is not None:
            self.writer = self._start_writer(store)
            self.writer.submit_base(
                fingerprints=base["fingerprints"],
                class_counts=base["class_counts"],
                reference_packed=base["reference_packed"],
                base_codes=base.get("base_codes"),
            )
            log.info(
                "compass-monitor: watching %d matrices (%d weights) on %d ranks (%s) -> %s",
                len(self.specs),
                self.num_weights,
                self.comm.world_size,
                self.core.layout.kind,
                run_dir,
            )
        else:
            self.writer = _RankWriter(run_dir)
        self._init_spectral()

    # -- spectral diagnostics -------------------------------------------------------------
    @torch.no_grad()
    def _init_spectral(self) -> None:
        """Rank 0 decomposes each base matrix once, gathered to it one matrix at a time (a collective)."""
        if not self.config.spectral_every:
            return
        # "auto" means "exact" here: rank 0 holds every matrix's base, and "perturb" keeps an
        # n x n basis and a reference to W0 per matrix (for an 8B model ~17 GB + 16 GB).
        config = self._spectral_config("exact" if self.config.spectral_method == "auto" else None)
        bases: list[SpectralBase | None] = []
        for p, spec in enumerate(self.specs):
            codes = self.core.gather_matrix(p, base=True)
            bases.append(None if codes is None else self._guard_spectral(spectral_base, spec, _as_bf16(codes, spec.shape, self.comm.device), config))
        self._spectral_bases = bases

    def _spectral_now(self) -> np.ndarray | None:
        """(P, 4) spectral diagnostics on rank 0 every ``spectral_every``-th snapshot (a collective on every rank).

        The spectrum needs the whole matrix: each is gathered to rank 0 in turn
        (2 bytes per weight) and measured there with its cached base. A failure on
        rank 0 gives that matrix NaN and is logged; it never stops the other ranks'
        gathers midway.
        """
        if self._spectral_bases is None or self._snapshots_taken % self.config.spectral_every:
            return None
        rows = np.full((len(self.specs), 4), np.nan)
        for p, spec in enumerate(self.specs):
            codes = self.core.gather_matrix(p, base=False)
            base = self._spectral_bases[p]
            if codes is None or base is None:
                continue
            drift = self._guard_spectral(spectral_drift_checked, spec, base, _as_bf16(codes, spec.shape, self.comm.device))
            if drift is not None:
                rows[p] = spectral_row(drift).cpu().numpy()
        return rows if self.core.is_writer else None

    def _guard_spectral(self, function: Any, spec: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except Exception as exc:  # rank 0 alone: raising here would leave the other ranks in the next gather
            log.error("compass-monitor: spectral diagnostics of %s failed (%s: %s); stored as NaN", spec.name, type(exc).__name__, exc)
            return None

    # -- facts ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def _warn_base_nonfinite(self, nonfinite: np.ndarray) -> None:
        if not self.core.is_writer:
            return
        for spec, bad in zip(self.specs, nonfinite):
            if bad:
                log.warning(
                    "compass-monitor: base of %s holds %d NaN/Inf values; they count as 0 in the reference "
                    "masks and any NaN in later weights counts as changed",
                    spec.name,
                    bad,
                )

    def _warn_nonfinite(self, nonfinite: np.ndarray) -> None:
        if self.core.is_writer:
            super()._warn_nonfinite(nonfinite)

    # -- steps and snapshots --------------------------------------------------------------
    def on_optimizer_step(self) -> None:
        """Record one real optimizer step; snapshot (a collective) every N. Call on every rank. Never raises."""
        if not self.enabled:
            return
        self.step += 1
        # No check of rank 0's writer here: a failure is agreed on at the next snapshot.
        if self.step % self.config.every_n_steps == 0:
            self._guarded(self._snapshot, self.step)

    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        if self._last_snapshot_step == step:
            return
        writer_failed = self.writer.error is not None
        skip = not writer_failed and self.config.when_queue_full == "skip" and self.writer.full()
        snap = self.core.measure() if not writer_failed else LocalSnapshot(counts=np.zeros((len(self.specs), 6), np.int64), payload=np.zeros(0, np.uint8))
        counts, flags = self.core.reduce(snap, skip=skip, error=writer_failed)
        if flags["error"]:
            mine = snap.error
            if writer_failed:
                mine = f"rank {self.rank}: the run-store writer failed ({self.writer.error_context}): {type(self.writer.error).__name__}: {self.writer.error}"
            reasons = [r for r in self.comm.all_gather_object(mine) if r]
            raise RuntimeError("; ".join(reasons) or "a rank failed")
        if flags["skip"]:
            self.writer.note_gap(step)  # rank 0; every rank keeps its previous masks
            return
        pieces = self.core.collect(snap)
        null = null_overlaps(self._class_counts, counts[:, 0])
        self._snapshots_taken += 1
        spectral = self._spectral_now()
        if pieces is not None and self.core.is_writer:
            rows, cols, packed = pieces
            record = SnapshotRecord(
                step=step, wall_time=time.time(), counts=counts, null_overlap=null, rows=rows, cols=cols, packed=packed,
                spectral=spectral,
            )
            # A refusal here (the writer failed meanwhile) is agreed on at the next snapshot.
            self.writer.submit(record)
        self.core.accept(snap)
        self._warn_nonfinite(counts[:, schema.COUNT_FIELDS.index("nonfinite")])
        self._last_snapshot_step = step
        self._latest = (step, counts, null)

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.disabled_reason = reason
        self._detach()
        self.writer.abort("disabled", reason=reason, step=self.step)
        log.error(
            "compass-monitor: disabled at step %d on rank %d: %s. Training continues%s.",
            self.step,
            self.rank,
            reason,
            f"; the run store keeps the {self.writer.num_snapshots} committed snapshots" if self.core.is_writer else "",
        )

    def close(self) -> None:
        """Last snapshot (if due; a collective), then rank 0 finalizes the store. Call on every rank. Never raises."""
        if not self.enabled:
            return
        if self.config.snapshot_on_close and self.step > 0 and self._last_snapshot_step != self.step:
            self.writer.flush()  # the last snapshot is never skipped for a full queue
            self._guarded(self._snapshot, self.step)
        if not self.enabled:
            return
        self._detach()
        self.enabled = False
        if not self.core.is_writer:
            return
        if self.writer.error is not None:
            reason = f"the run-store writer failed ({self.writer.error_context}): {type(self.writer.error).__name__}: {self.writer.error}"
            self.disabled_reason = reason
            self.writer.abort("disabled", reason=reason, step=self.step)
            log.error("compass-monitor: %s; the run store keeps the %d committed snapshots", reason, self.writer.num_snapshots)
            return
        self._finish_store()

    # -- checkpoints ------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rewind to a checkpoint's step (see :meth:`CompassMonitor.load_state_dict`). Call on every rank."""
        if self.enabled:
            from . import sharded_resume

            self._guarded(sharded_resume.rewind, self, int(state["step"]))


def _as_bf16(codes: np.ndarray, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Gathered int16 bf16 codes as the (m, n) bf16 matrix, on the collective device."""
    return torch.from_numpy(codes).view(torch.bfloat16).reshape(shape).to(device)
