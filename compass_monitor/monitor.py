"""CompassMonitor: snapshots bf16 update masks every N real optimizer steps.

Usage (plain PyTorch, see ``compass_monitor.integrations.pytorch``)::

    monitor = CompassMonitor(model, "runs/my-run", config=MonitorConfig(every_n_steps=10))
    for batch in loader:
        ...; optimizer.step(); monitor.on_optimizer_step()
    monitor.close()

The core knows no framework: adapters decide when a real optimizer step
happened and call :meth:`CompassMonitor.on_optimizer_step`.

The monitor never takes a training run down: once constructed, any failure in
it (disk full, a resized parameter, a store error) is logged, the run store is
marked ``disabled`` if possible, and the monitor detaches itself. Errors in the
constructor (bad configuration, no matching parameters, an occupied store
path) are raised, because they happen before training starts and say what to fix.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__ as _version
from .aggregates import aggregate_counts, by_module_type, everything_linear, scalars
from .config import MonitorConfig
from .matrix_probe import MatrixBase, capture_base, measure
from .precision_null import null_overlaps
from .selection import ParamSpec, select_matrices
from .spectral import SpectralBase, SpectralConfig, SpectralDrift, spectral_base, spectral_drift_checked
from .store import schema
from .store.async_writer import AsyncWriter
from .store.resume import ResumePlan, plan_resume, resume_config
from .store.writer import RunWriter, SnapshotRecord

__all__ = ["CompassMonitor"]

log = logging.getLogger(__name__)

METHODS = {
    "changed": "bitwise bf16 inequality, +0 == -0, NaN always changed (paper Def. 2.1, App. D.2)",
    "principal_mask": "top-alpha of |rank-k reconstruction of W0|: top-k eigenvectors (float64 eigh) of the exact fixed-point Gram matrix of the smaller side, projection in float64 chunks of 256 global rows, rounded to float32; identical bits on any number of ranks (compass_monitor.principal); exact count floor(alpha*n), ties by lowest flat index",
    "low_mask": "bottom-alpha of |W0|, exact count floor(alpha*n), ties by lowest flat index",
    "precision_null": "i.i.d. Gaussian noise sized to flip |M| weights in expectation, closed form over 512 bf16 spacing classes",
}


def _versions() -> dict[str, str]:
    import zarr

    return {
        "compass_monitor": _version,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "python": platform.python_version(),
    }


class CompassMonitor:
    """Watches where a model's bf16 weights change, and writes it to a run store.

    At construction it selects the parameters (2-D weights of linear layers by
    default), takes the base W0 (bf16, on the parameters' device), computes the
    principal and low-magnitude masks once, and creates the run store. Each
    snapshot stores, per matrix, the packed changed mask, the row and column
    change counts, and the overlap counts with the reference masks; with the
    precision null of each overlap.

    A model whose parameters are sharded across processes (FSDP1, FSDP2 /
    DTensor ``Shard(0)``, HSDP) gets a
    :class:`~compass_monitor.sharded_monitor.ShardedMonitor` instead: the same
    API and the same store, created and driven on every rank (docs/sharding.md).

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
        optimizer: the training optimizer, if known: parameters in none of its
            param groups count as frozen (left out unless ``include_frozen``).

    Raises:
        ConfigError: an invalid configuration.
        SelectionError: no parameter matches the configuration.
        StoreExistsError: ``run_dir`` holds a run or other files.
        ResumeError: (``resume=True``) the store cannot be continued with this
            model or configuration; the message names what differs.
    """

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> "CompassMonitor":
        # A model whose parameters are sharded across processes (FSDP1, FSDP2 /
        # DTensor) gets the sharded monitor: same API and store, one instance per rank.
        if cls is CompassMonitor and model is not None:
            from .sharding import sharding_kind

            if sharding_kind(model) != "plain":
                from .sharded_monitor import ShardedMonitor

                return super().__new__(ShardedMonitor)
        return super().__new__(cls)

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
        optimizer: Any = None,
    ) -> None:
        if resume:
            config = resume_config(run_dir, config)
        self.config = config or MonitorConfig()
        # Every matrix is read through its canonical (out, in) view (compass_monitor.selection).
        selection = select_matrices(model, self.config, optimizer=optimizer)
        views = [m.matrix for m in selection.matrices]
        self._start([m.spec for m in selection.matrices], views, selection.facts, run_dir, run_name=run_name,
                    metadata=metadata, model_class=type(model).__name__, resume=resume, resume_step=resume_step)  # fmt: skip

    @classmethod
    def from_layout(
        cls,
        layout: Any,
        run_dir: str | os.PathLike[str],
        *,
        config: MonitorConfig | None = None,
        run_name: str | None = None,
        metadata: dict[str, Any] | None = None,
        model_class: str = "",
        resume: bool = False,
        resume_step: int | None = None,
    ) -> "CompassMonitor":
        """A monitor over a :class:`~compass_monitor.sharding.ShardLayout` of whole matrices on one process
        (e.g. checkpoint tensors loaded lazily by ``values()``); the rest as for the constructor.

        Raises:
            ShardingError: a layout whose matrices are split across ranks (use the model-taking constructor).
        """
        from .sharding import ShardingError

        if layout.distributed or any(not shard.is_whole for shard in layout.shards):
            raise ShardingError(f"from_layout takes whole matrices on one process; this layout is {layout.kind!r}")
        monitor = super().__new__(CompassMonitor)
        if resume:
            config = resume_config(run_dir, config)
        monitor.config = config or MonitorConfig()
        views = [lambda shard=shard: shard.values().reshape(shard.spec.shape) for shard in layout.shards]
        monitor._start(layout.specs, views, dict(layout.facts), run_dir, run_name=run_name, metadata=metadata,
                       model_class=model_class, resume=resume, resume_step=resume_step)  # fmt: skip
        return monitor

    def _start(
        self,
        specs: list[ParamSpec],
        views: list[Callable[[], torch.Tensor]],
        facts: dict[str, Any],
        run_dir: str | os.PathLike[str],
        *,
        run_name: str | None,
        metadata: dict[str, Any] | None,
        model_class: str,
        resume: bool,
        resume_step: int | None,
    ) -> None:
        """Take the base and create the store, or continue it (``resume``); ``views`` return each matrix now."""
        self.specs: list[ParamSpec] = specs
        self._views = views
        self._selection_facts = facts
        self._init_state()
        if resume:
            self._resume(run_dir, resume_step=resume_step, run_name=run_name, metadata=metadata)
            self._init_spectral()
            return

        self._states, class_counts, fingerprints = self._capture_base()
        self._class_counts = class_counts
        attributes = self._store_attributes(run_dir, run_name, metadata, model_class=model_class, selection=self._selection_facts)
        store = RunWriter.create(run_dir, params=self.specs, attributes=attributes, key_interval=self.config.key_interval)
        self.writer = self._start_writer(store)
        # The base goes through the writer thread too (compressing W0 takes a while);
        # CPU tensors are handed over as zero-copy views (they are never modified).
        self.writer.submit_base(
            fingerprints=fingerprints,
            class_counts=class_counts,
            reference_packed=[state.reference_packed.cpu().numpy() for state in self._states],
            base_codes=[state.base_bits.cpu().numpy() for state in self._states] if self.config.store_base else None,
        )
        self._init_spectral()
        log.info("compass-monitor: watching %d matrices (%d weights) -> %s", len(self.specs), self.num_weights, run_dir)

    def _init_state(self) -> None:
        """The per-run state both monitors start from (before their base or a resume sets it)."""
        self._hooks: list[Any] = []
        self.step = 0
        self._last_snapshot_step: int | None = None
        self._warned: dict[str, int] = {}
        self._latest: tuple[int, np.ndarray, np.ndarray] | None = None
        self.enabled = True
        self.disabled_reason: str | None = None
        #: cached base decompositions (the sharded monitor: on rank 0, None per matrix elsewhere); None: spectral off
        self._spectral_bases: list[SpectralBase | None] | None = None
        self._snapshots_taken = 0

    def _store_attributes(
        self,
        run_dir: str | os.PathLike[str],
        run_name: str | None,
        metadata: dict[str, Any] | None,
        *,
        model_class: str,
        selection: dict[str, Any] | None = None,
        **run_facts: Any,
    ) -> dict[str, Any]:
        """The new store's attributes: the run's facts, configuration, method notes and versions."""
        return {
            "run": {
                "name": run_name or os.path.basename(os.path.abspath(os.fspath(run_dir))),
                "created": time.time(),
                "model_class": model_class,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **run_facts,
            },
            "config": self.config.to_dict(),
            "methods": METHODS,
            "count_fields": list(schema.COUNT_FIELDS),
            "reference_masks": list(schema.REFERENCE_MASKS),
            "versions": _versions(),
            "metadata": metadata or {},
            "selection": selection or {},
        }

    def _spectral_config(self, method: str | None = None) -> SpectralConfig:
        return SpectralConfig(
            k=self.config.spectral_k, every_n_snapshots=self.config.spectral_every, method=method or self.config.spectral_method
        )

    @torch.no_grad()
    def _init_spectral(self) -> None:
        """Decompose each base matrix once (from the stored W0 codes, so a resumed run uses the true base)."""
        if not self.config.spectral_every:
            return
        config = self._spectral_config()
        self._spectral_bases = [spectral_base(state.base_bits.view(torch.bfloat16), config) for state in self._states]

    def _start_writer(self, store: RunWriter) -> AsyncWriter:
        return AsyncWriter(store, queue_size=self.config.writer_queue, when_full=self.config.when_queue_full)

    # -- resume ------------------------------------------------------------------
    def _resume(self, run_dir: str | os.PathLike[str], *, resume_step: int | None, run_name: str | None, metadata: dict[str, Any] | None) -> None:
        AsyncWriter.release(run_dir)  # a monitor of this process that was never closed stops writing first
        plan = plan_resume(run_dir, self.specs, self._current(), self.config, resume_step=resume_step)
        store = RunWriter.open_existing(run_dir, key_interval=self.config.key_interval)
        event = {"step": plan.step, "pid": os.getpid(), "host": socket.gethostname()}
        if run_name or metadata:
            event.update({"run_name": run_name, "metadata": metadata or {}})
        store.resume(plan.keep, event=event)
        self._states = plan.states
        self._class_counts = plan.class_counts
        self._restore(plan, store)
        self.writer = self._start_writer(store)
        log.info(
            "compass-monitor: resumed %s at step %d: kept %d snapshots, dropped %d",
            run_dir,
            plan.step,
            plan.keep,
            plan.dropped,
        )

    def _restore(self, plan: ResumePlan, store: RunWriter) -> None:
        """Step counter, previous masks (for flips_since_previous) and latest scalars after a resume/rewind."""
        for state, packed in zip(self._states, store.previous_packed):
            state.previous_packed = torch.from_numpy(np.array(packed, copy=True)).to(state.base_bits.device)
        self.step = plan.step
        self._last_snapshot_step = plan.last_snapshot_step
        self._latest = plan.latest
        self._snapshots_taken = plan.keep  # the spectral cadence counts stored snapshots, across resumes

    def state_dict(self) -> dict[str, Any]:
        """Minimal state for a training checkpoint: the step counter and the last snapshot's step."""
        return {
            "step": self.step,
            "last_snapshot_step": self._last_snapshot_step,
            "run_dir": self.run_dir,
            "schema_version": schema.SCHEMA_VERSION,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`: rewind to its step. Never raises.

        Snapshots after the checkpoint's step are dropped from the store
        (recorded in its history); the step counter and the previous masks are
        restored from the store. Use with ``resume=True``.
        """
        if self.enabled:
            self._guarded(self._rewind, int(state["step"]))

    def _rewind(self, step: int) -> None:
        self.writer.flush()
        if self.writer.error is not None:
            self._raise_writer_error()
        plan = plan_resume(self.run_dir, self.specs, self._current(), self.config, resume_step=step, states=self._states, check_model=False)
        self.writer.call(lambda store: store.resume(plan.keep, event={"step": step, "by": "load_state_dict"}))
        self._restore(plan, self.writer.writer)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every snapshot taken so far is committed to the store. True if done in time."""
        return self.writer.flush(timeout)

    def _raise_writer_error(self) -> None:
        error = self.writer.error
        raise RuntimeError(f"the run-store writer failed ({self.writer.error_context}): {type(error).__name__}: {error}")

    def _current(self) -> list[torch.Tensor]:
        """The monitored matrices' current values, each (m, n) (views where the layout allows)."""
        return [view() for view in self._views]

    @property
    def num_weights(self) -> int:
        return sum(spec.numel for spec in self.specs)

    @property
    def run_dir(self) -> str:
        return str(self.writer.path)

    # -- base ------------------------------------------------------------------
    @torch.no_grad()
    def _capture_base(self) -> tuple[list[MatrixBase], np.ndarray, np.ndarray]:
        states, counts, fingerprints, nonfinite = [], [], [], []
        for spec, param in zip(self.specs, self._current()):
            state, class_count, fingerprint, bad = capture_base(
                spec, param, rank=self.config.principal_rank, alpha=self.config.alpha
            )
            if self.config.base_device == "cpu":  # W0 and the packed masks in host memory
                state.base_bits, state.reference_packed, state.previous_packed = (
                    state.base_bits.cpu(),
                    state.reference_packed.cpu(),
                    state.previous_packed.cpu(),
                )
            states.append(state)
            counts.append(class_count)
            fingerprints.append(fingerprint)
            nonfinite.append(bad)
        bad_counts = torch.stack(nonfinite).cpu().numpy()
        for spec, bad in zip(self.specs, bad_counts):
            if bad:
                log.warning(
                    "compass-monitor: base of %s holds %d NaN/Inf values; they count as 0 in the reference "
                    "masks and any NaN in later weights counts as changed",
                    spec.name,
                    bad,
                )
        return states, torch.stack(counts).cpu().numpy(), torch.stack(fingerprints).cpu().numpy()

    # -- step counting ---------------------------------------------------------
    def own_hook(self, handle: Any) -> None:
        """Keep a hook handle (anything with ``remove()``) to remove on close or disable.

        Adapters register their framework hooks and hand the handles here.
        """
        self._hooks.append(handle)

    def on_optimizer_step(self) -> None:
        """Record that one optimizer step ran; snapshot if it is the N-th. Never raises.

        Adapters call this once per real optimizer step (for plain PyTorch,
        ``compass_monitor.integrations.pytorch.attach_optimizer`` does).
        """
        if not self.enabled:
            return
        self.step += 1
        if self.writer.error is not None:
            self._guarded(self._raise_writer_error)
            return
        if self.step % self.config.every_n_steps == 0:
            self._guarded(self._snapshot, self.step)

    def snapshot(self, step: int | None = None) -> None:
        """Take a snapshot now, labelled ``step`` (default: the current step count). Never raises."""
        if self.enabled:
            self._guarded(self._snapshot, self.step if step is None else step)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # the monitor must never take training down
            self._disable(f"{type(exc).__name__}: {exc}")

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.disabled_reason = reason
        self._detach()
        # Writes what is still queued (if the writer is healthy), then marks the store.
        self.writer.abort("disabled", reason=reason, step=self.step)
        log.error(
            "compass-monitor: disabled at step %d: %s. Training continues; the run store keeps the %d committed snapshots.",
            self.step,
            reason,
            self.writer.num_snapshots,
        )

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- snapshot ----------------------------------------------------------------
    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        if self._last_snapshot_step == step:
            return
        if self.writer.error is not None:
            self._raise_writer_error()
        if self.config.when_queue_full == "skip" and self.writer.full():
            # The writer is behind: skip the snapshot before paying for it; the
            # next one's flips are then counted against the last stored mask.
            self.writer.note_gap(step)
            return
        measurements = [measure(state, param) for state, param in zip(self._states, self._current())]
        # One host transfer per kind of result for the whole snapshot.
        counts = torch.stack([m.counts for m in measurements]).cpu().numpy()
        rows = torch.cat([m.rows for m in measurements]).cpu().numpy()
        cols = torch.cat([m.cols for m in measurements]).cpu().numpy()
        packed = torch.cat([m.packed for m in measurements]).cpu().numpy()
        self._snapshots_taken += 1
        record = SnapshotRecord(
            step=step,
            wall_time=time.time(),
            counts=counts,
            null_overlap=null_overlaps(self._class_counts, counts[:, 0]),
            rows=_split(rows, [s.shape[0] for s in self.specs]),
            cols=_split(cols, [s.shape[1] for s in self.specs]),
            packed=_split(packed, [(s.numel + 7) // 8 for s in self.specs]),
            spectral=self._spectral_now(),
        )
        self._warn_nonfinite(counts[:, schema.COUNT_FIELDS.index("nonfinite")])
        if not self.writer.submit(record) and self.writer.error is not None:
            self._raise_writer_error()
        self._last_snapshot_step = step
        self._latest = (step, record.counts, record.null_overlap)

    def _spectral_now(self) -> np.ndarray | None:
        """(P, 4) spectral diagnostics on every ``spectral_every``-th snapshot, else None."""
        if self._spectral_bases is None or self._snapshots_taken % self.config.spectral_every:
            return None
        rows = []
        for base, state, param in zip(self._spectral_bases, self._states, self._current()):
            # W_t as the bf16 values the changed mask sees (fp32 masters rounded like the probe).
            current = param.detach().reshape(state.spec.shape).to(torch.bfloat16)
            # "perturb" (auto on large GPU matrices) flags drift beyond its validity; those are redone exactly.
            rows.append(spectral_row(spectral_drift_checked(base, current)))
        return torch.stack(rows).cpu().numpy()

    def latest_scalars(self, *, prefix: str = "compass") -> dict[str, float]:
        """Scalars of the latest snapshot for a logger, ``{}`` before the first one.

        Groups: ``all_linear`` (the global numbers), each module type (q, k, v,
        o, gate, up, down, ...) and each other monitored role. Keys and values
        are those that ``aggregates.scalars`` derives from the stored counts.
        """
        if self._latest is None:
            return {}
        _, counts, null = self._latest
        mask_sizes = self._class_counts[:, 1:, :].sum(axis=2)
        out: dict[str, float] = {}
        for key in (everything_linear, by_module_type):
            stats = aggregate_counts(params=self.specs, counts=counts[None], null=null[None], mask_sizes=mask_sizes, key=key)
            out.update(scalars(stats, prefix=prefix))
        return out

    @property
    def latest_step(self) -> int | None:
        """Optimizer step of the latest committed snapshot."""
        return None if self._latest is None else self._latest[0]

    def _warn_nonfinite(self, nonfinite: np.ndarray) -> None:
        for spec, bad in zip(self.specs, nonfinite):
            if bad and self._warned.get(spec.name, 0) < self.config.max_warnings_per_param:
                self._warned[spec.name] = self._warned.get(spec.name, 0) + 1
                log.warning(
                    "compass-monitor: %s holds %d NaN/Inf values at step %d (NaNs count as changed)",
                    spec.name,
                    bad,
                    self.step,
                )

    # -- end of run ----------------------------------------------------------------
    def close(self) -> None:
        """Take the last snapshot (if configured and due), wait for the writer, finalize the store, detach. Never raises."""
        if not self.enabled:
            return
        if self.writer.error is not None:
            self._guarded(self._raise_writer_error)
            return
        if self.config.snapshot_on_close and self.step > 0 and self._last_snapshot_step != self.step:
            self.writer.flush()  # the last snapshot is never skipped for a full queue
            self._guarded(self._snapshot, self.step)
        if not self.enabled:
            return
        self._detach()
        self._finish_store()
        self.enabled = False

    def _finish_store(self) -> None:
        """Finalize the store as ``finished``; if that fails, log it and mark the store ``disabled``."""
        self.writer.close("finished")
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


def spectral_row(drift: SpectralDrift) -> torch.Tensor:
    """A matrix's stored spectral diagnostics, float64 in ``schema.SPECTRAL_FIELDS`` order (on its device)."""
    return torch.stack([getattr(drift, name) for name in schema.SPECTRAL_FIELDS]).double()


def _split(flat: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(sizes)[:-1])
