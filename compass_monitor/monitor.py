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
from .selection import ParamSpec, select_parameters
from .store import schema
from .store.writer import RunWriter, SnapshotRecord

__all__ = ["CompassMonitor"]

log = logging.getLogger(__name__)

METHODS = {
    "changed": "bitwise bf16 inequality, +0 == -0, NaN always changed (paper Def. 2.1, App. D.2)",
    "principal_mask": "top-alpha of |rank-k reconstruction of W0| (torch.linalg.svd, float32), exact count floor(alpha*n), ties by lowest flat index",
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

    Args:
        model: the module whose parameters are monitored (its current weights are the base).
        run_dir: a new or empty directory for the run store.
        config: what to measure and how often.
        run_name: a label for the run (default: the directory name).
        metadata: JSON-serialisable facts to record (model id, task, seed, ...).

    Raises:
        ConfigError: an invalid configuration.
        SelectionError: no parameter matches the configuration.
        StoreExistsError: ``run_dir`` holds a run or other files.
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | os.PathLike[str],
        *,
        config: MonitorConfig | None = None,
        run_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.config = config or MonitorConfig()
        selected = select_parameters(model, self.config)
        self.specs: list[ParamSpec] = [spec for spec, _ in selected]
        self._params: list[torch.Tensor] = [param for _, param in selected]
        self._hooks: list[Any] = []
        self.step = 0
        self._last_snapshot_step: int | None = None
        self._warned: dict[str, int] = {}
        self._latest: tuple[int, np.ndarray, np.ndarray] | None = None
        self.enabled = True
        self.disabled_reason: str | None = None

        self._states, class_counts, fingerprints = self._capture_base()
        self._class_counts = class_counts
        attributes = {
            "run": {
                "name": run_name or os.path.basename(os.path.abspath(os.fspath(run_dir))),
                "created": time.time(),
                "model_class": type(model).__name__,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            },
            "config": self.config.to_dict(),
            "methods": METHODS,
            "count_fields": list(schema.COUNT_FIELDS),
            "reference_masks": list(schema.REFERENCE_MASKS),
            "versions": _versions(),
            "metadata": metadata or {},
        }
        self.writer = RunWriter.create(run_dir, params=self.specs, attributes=attributes)
        self.writer.write_base(
            fingerprints=fingerprints,
            class_counts=class_counts,
            reference_packed=[state.reference_packed.cpu().numpy() for state in self._states],
        )
        log.info("compass-monitor: watching %d matrices (%d weights) -> %s", len(self.specs), self.num_weights, run_dir)

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
        for spec, param in zip(self.specs, self._params):
            state, class_count, fingerprint, bad = capture_base(
                spec, param, rank=self.config.principal_rank, alpha=self.config.alpha
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
        log.error(
            "compass-monitor: disabled at step %d: %s. Training continues; the run store keeps the %d committed snapshots.",
            self.step,
            reason,
            self.writer.num_snapshots,
        )
        self.enabled = False
        self.disabled_reason = reason
        self._detach()
        try:
            self.writer.mark("disabled")
        except Exception as exc:
            log.error("compass-monitor: could not mark the run store disabled: %s", exc)

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- snapshot ----------------------------------------------------------------
    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        if self._last_snapshot_step == step:
            return
        measurements = [measure(state, param) for state, param in zip(self._states, self._params)]
        # One host transfer per kind of result for the whole snapshot.
        counts = torch.stack([m.counts for m in measurements]).cpu().numpy()
        rows = torch.cat([m.rows for m in measurements]).cpu().numpy()
        cols = torch.cat([m.cols for m in measurements]).cpu().numpy()
        packed = torch.cat([m.packed for m in measurements]).cpu().numpy()
        record = SnapshotRecord(
            step=step,
            wall_time=time.time(),
            counts=counts,
            null_overlap=null_overlaps(self._class_counts, counts[:, 0]),
            rows=_split(rows, [s.shape[0] for s in self.specs]),
            cols=_split(cols, [s.shape[1] for s in self.specs]),
            packed=_split(packed, [(s.numel + 7) // 8 for s in self.specs]),
        )
        self._warn_nonfinite(counts[:, schema.COUNT_FIELDS.index("nonfinite")])
        self.writer.append(record)
        self._last_snapshot_step = step
        self._latest = (step, record.counts, record.null_overlap)

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
        """Take the last snapshot (if configured and due), finalize the store, detach. Never raises."""
        if not self.enabled:
            return
        if self.config.snapshot_on_close and self.step > 0 and self._last_snapshot_step != self.step:
            self._guarded(self._snapshot, self.step)
        if not self.enabled:
            return
        self._detach()
        try:
            self.writer.finalize(status="finished")
        except Exception as exc:
            self._disable(f"finalize failed: {type(exc).__name__}: {exc}")
        self.enabled = False

    def __enter__(self) -> "CompassMonitor":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _split(flat: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(sizes)[:-1])
