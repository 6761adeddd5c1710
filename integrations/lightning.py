"""Lightning: a ``Callback`` that monitors the LightningModule's weights.

One line in an existing Lightning script::

    from compass_monitor.integrations.lightning import CompassCallback
    trainer = L.Trainer(..., callbacks=[CompassCallback("runs/my-run", config=MonitorConfig(every_n_steps=10))])

What it does, hook by hook (the shared logic is ``integrations/_core.py``):

* ``on_train_start``: binds the parameters and takes the base W0 (weights are
  final here: restored from a checkpoint, and sharded, only after
  ``on_fit_start``). A whole model (one device, DDP) is monitored on global
  rank 0 only: other ranks hold the same weights and do nothing. A sharded
  model (FSDP, FSDP2 / ``ModelParallelStrategy``) gets a monitor on every
  rank, which the core keeps in step with collectives; rank 0 writes the
  store and logs. A second ``trainer.fit()`` with the same callback continues
  the same store at the real optimizer step. Nothing here raises into
  training: a monitor that cannot start logs why, and training runs unmonitored.
* ``on_train_batch_end``: one monitor step per training batch in which an
  optimizer really stepped: ``trainer.global_step`` advanced (so micro-batches
  of ``accumulate_grad_batches`` do not count, the pattern of Lightning's
  ``WeightAveraging``) and a post-step hook on one of ``trainer.optimizers``
  fired (so a step that ``GradScaler`` skipped does not count). With several
  optimizers stepping in one batch it is still one step. After a snapshot its
  scalars go to every logger in ``trainer.loggers`` (``log_metrics``, the way
  ``LearningRateMonitor`` logs), at the snapshot's step.
* ``state_dict`` / ``load_state_dict``: the step counters, so that a fit
  resumed from a checkpoint continues the same run store.
* ``on_train_end``: the last snapshot, logged, and the store finalized.

Logged keys are those of :meth:`CompassMonitor.latest_scalars`:
``compass/{all_linear,q,k,v,o,gate,up,down,...}/{sparsity,flips,overlap_*,rand_*,null_*}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from compass_monitor import CompassMonitor, MonitorConfig

from ._core import AdapterCore, monitored_on_every_rank

__all__ = ["CompassCallback"]

log = logging.getLogger(__name__)


class CompassCallback(Callback):
    """Monitors where the LightningModule's bf16 weights change, every N real optimizer steps.

    Args:
        run_dir: a new or empty directory for the run store (on resume: the
            store the checkpointed run wrote).
        config: what to measure and how often (``every_n_steps`` counts real
            optimizer steps).
        log_scalars: send each snapshot's scalars to ``trainer.loggers``.
        prefix: first component of the logged keys.
        log_groups: only these groups' scalars (e.g. ``("all_linear",)`` for the
            global numbers alone); default: all of them (``all_linear`` and each
            module type).
        run_name, metadata: recorded in the store (see :class:`CompassMonitor`).

    Example::

        trainer = L.Trainer(max_steps=1000, accumulate_grad_batches=4,
                            callbacks=[CompassCallback("runs/sft", config=MonitorConfig(every_n_steps=25))])
        trainer.fit(model, datamodule)
        open_run("runs/sft").steps   # optimizer steps of the snapshots: 25, 50, ...
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: MonitorConfig | None = None,
        log_scalars: bool = True,
        prefix: str = "compass",
        log_groups: Sequence[str] | None = None,
        run_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = os.fspath(run_dir)
        self.config = config or MonitorConfig()
        self.log_scalars = log_scalars
        self.core = AdapterCore(
            self.run_dir, config=self.config, prefix=prefix, log_groups=log_groups, run_name=run_name, metadata=metadata
        )
        self._last_global_step = 0
        self._resume_from: dict[str, Any] | None = None

    @property
    def monitor(self) -> CompassMonitor | None:
        """The monitor of the current (or last) fit on this rank; None where this rank does not monitor."""
        return self.core.monitor

    # -- set-up ------------------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        resume, self._resume_from = self._resume_from, None
        self._last_global_step = trainer.global_step if resume is None else resume.get("last_global_step", 0)
        try:
            every_rank = monitored_on_every_rank(pl_module)
        except Exception as exc:  # DeepSpeed ZeRO-3 and other layouts the core cannot read
            every_rank = None
            log.error("compass-monitor: this run is not monitored: %s", exc)
        self.core.start(
            pl_module,
            metadata={"framework": "lightning", "lightning": pl.__version__, "strategy": type(trainer.strategy).__name__},
            optimizers=trainer.optimizers,
            framework_step=trainer.global_step,
            checkpoint=None if resume is None else resume.get("monitor"),
            create=every_rank is not None and (trainer.is_global_zero or every_rank),
        )

    # -- steps -------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step <= self._last_global_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self._last_global_step = trainer.global_step
        if self.core.step():
            self._log(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.core.finish()
        self._log(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # Commit what was measured and leave the store "running", so that a fit resumed from a checkpoint continues it.
        self.core.interrupted()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.core.gate.remove()

    def _log(self, trainer: "pl.Trainer") -> None:
        if not self.log_scalars or not trainer.is_global_zero:
            return
        scalars = self.core.new_scalars()
        if scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=self.core.monitor.latest_step)

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"run_dir": self.run_dir, "last_global_step": self._last_global_step}
        monitor = self.core.checkpoint_state()
        if monitor is not None:
            state["monitor"] = monitor
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.core.same_run(state_dict.get("run_dir")):
            self._resume_from = dict(state_dict)
        else:  # another run's checkpoint: a new run whose base is the checkpoint's weights
            self._resume_from = {"last_global_step": state_dict.get("last_global_step", 0)}
