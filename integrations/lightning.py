"""Lightning: a ``Callback`` that monitors the LightningModule's weights.

One line in an existing Lightning script::

    from compass_monitor.integrations.lightning import CompassCallback
    trainer = L.Trainer(..., callbacks=[CompassCallback("runs/my-run", config=MonitorConfig(every_n_steps=10))])

What it does, hook by hook:

* ``setup``: refuses DeepSpeed, and ``FSDPStrategy`` / ``ModelParallelStrategy``
  (FSDP2) when the installed core has no sharded support, before any work starts.
* ``on_train_start``: binds the parameters and takes the base W0 (weights are
  final here: restored from a checkpoint, and sharded, only after
  ``on_fit_start``). A whole model (one device, DDP) is monitored on global
  rank 0 only: other ranks hold the same weights and do nothing. A sharded
  model (FSDP, FSDP2) gets a monitor on every rank, which the core keeps in
  step with collectives; rank 0 writes the store and logs.
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
import torch
from lightning.pytorch.callbacks import Callback

from compass_monitor import CompassMonitor, MonitorConfig

from ._resume import create_or_resume, monitor_state, select_groups
from ._sharding import UnsupportedShardingError, core_supports_sharding, monitor_on_every_rank

__all__ = ["CompassCallback", "UnsupportedShardingError"]

log = logging.getLogger(__name__)

_FSDP_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy")


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

    Raises:
        UnsupportedShardingError: (at ``setup`` / ``on_train_start``) the
            strategy shards parameters in a way the installed core cannot
            monitor (DeepSpeed; FSDP / FSDP2 without the core's sharded support).

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
        self.prefix = prefix
        self.log_groups = None if log_groups is None else tuple(log_groups)
        self.run_name = run_name
        self.metadata = metadata
        self.monitor: CompassMonitor | None = None
        self._last_global_step = 0
        self._stepped = False
        self._handles: list[Any] = []
        self._logged_step: int | None = None
        self._resume_from: dict[str, Any] | None = None

    # -- set-up ------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy.startswith("DeepSpeed") or (strategy in _FSDP_STRATEGIES and not core_supports_sharding()):
            raise UnsupportedShardingError(
                f"CompassCallback cannot watch a model trained with {strategy}: it shards parameters across "
                "processes in a way this compass-monitor core cannot measure (it reads FSDP1 and FSDP2 / DTensor "
                "shards when it has sharded support). Use a single device, DDPStrategy or FSDP, or leave "
                "CompassCallback out of this run."
            )

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        every_rank = monitor_on_every_rank(pl_module, where=f"Lightning {type(trainer.strategy).__name__}")
        self._last_global_step = trainer.global_step if self._resume_from is None else self._resume_from["last_global_step"]
        if not (trainer.is_global_zero or every_rank):
            return
        self.monitor = create_or_resume(
            pl_module,
            self.run_dir,
            config=self.config,
            run_name=self.run_name,
            metadata={"framework": "lightning", "lightning": pl.__version__, **(self.metadata or {})},
            state=None if self._resume_from is None else self._resume_from.get("monitor"),
        )
        self._resume_from = None
        self._logged_step = self.monitor.latest_step  # a resumed run's last snapshot was logged before the crash
        for optimizer in trainer.optimizers:
            handle = optimizer.register_step_post_hook(self._on_optimizer_step)
            self._handles.append(handle)
            self.monitor.own_hook(handle)

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = True

    # -- steps -------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step <= self._last_global_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self._last_global_step = trainer.global_step
        stepped, self._stepped = self._stepped, False
        monitor = self.monitor
        if monitor is None or not monitor.enabled or not stepped:
            return
        monitor.on_optimizer_step()
        self._log(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.monitor is None:
            return
        self.monitor.close()
        self._log(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # Commit what was measured and leave the store "running", so that a fit resumed from a checkpoint continues it.
        self._remove_hooks()
        if self.monitor is not None and self.monitor.enabled and hasattr(self.monitor, "flush"):
            self.monitor.flush()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _log(self, trainer: "pl.Trainer") -> None:
        monitor = self.monitor
        if not self.log_scalars or not trainer.is_global_zero or monitor is None or monitor.latest_step in (None, self._logged_step):
            return
        scalars = select_groups(monitor.latest_scalars(prefix=self.prefix), self.log_groups)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=monitor.latest_step)
        self._logged_step = monitor.latest_step

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"run_dir": self.run_dir, "last_global_step": self._last_global_step}
        if self.monitor is not None:
            state["monitor"] = monitor_state(self.monitor)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if os.path.abspath(state_dict.get("run_dir", self.run_dir)) != os.path.abspath(self.run_dir):
            log.warning(
                "compass-monitor: the checkpoint's CompassCallback wrote to %s, this one to %s: starting a new run "
                "whose base W0 is the checkpoint's weights (pass the same run_dir to continue that run instead)",
                state_dict.get("run_dir"),
                self.run_dir,
            )
            self._resume_from = {"last_global_step": state_dict.get("last_global_step", 0)}
            return
        self._resume_from = dict(state_dict)
