"""The framework-neutral adapter core: what every adapter (Lightning, HF Trainer, verl) does, written once.

* :class:`StepGate`: a training step counts only if an optimizer really
  stepped (``Optimizer.register_step_post_hook``: a step that
  ``torch.amp.GradScaler`` skips for non-finite gradients does not fire it).
* :class:`AdapterCore`: one run store across ``fit()`` / ``train()`` calls.
  :meth:`AdapterCore.start` creates the monitor, continues a framework
  checkpoint's run (the resume rules at the checkpoint's step), or continues
  the store an earlier ``fit()``/``train()`` of the same adapter wrote (at the
  real optimizer step the weights have taken, or by the resume rules if the
  framework's step went back). It never raises into training: a failure is
  logged with what to do, and training runs unmonitored.
* scalars of each snapshot handed out once (:meth:`AdapterCore.new_scalars`),
  the checkpoint state (:meth:`AdapterCore.checkpoint_state`) and the
  warning for a checkpoint of another run store (:meth:`AdapterCore.same_run`).

The core imports no training framework.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig
from compass_monitor.sharding import sharding_kind

__all__ = ["AdapterCore", "StepGate", "monitor_state", "select_groups", "monitored_on_every_rank"]

log = logging.getLogger("compass_monitor.integrations")


def select_groups(scalars: dict[str, float], groups: Sequence[str] | None) -> dict[str, float]:
    """The scalars of the named groups (``{prefix}/{group}/{name}`` keys); all of them for None."""
    if groups is None:
        return scalars
    return {key: value for key, value in scalars.items() if key.rsplit("/", 2)[-2] in groups}


def monitor_state(monitor: CompassMonitor) -> dict[str, Any]:
    """The monitor's checkpoint state (small, JSON-serialisable), after the store committed every snapshot so far."""
    if monitor.enabled:
        monitor.flush()
    return monitor.state_dict()


def monitored_on_every_rank(model: nn.Module) -> bool:
    """Whether ``model`` is sharded (FSDP1, FSDP2/DTensor): then a monitor runs on every rank, kept in step by
    collectives (rank 0 writes); a whole model (one device, DDP) is monitored by rank 0 alone.

    Raises:
        ShardingError: DeepSpeed ZeRO-3 partitioned parameters (the message says what is read).
    """
    return sharding_kind(model) != "plain"


def _solo_group(model: nn.Module) -> Any:
    """A one-rank process group holding rank 0, for a whole model (one device, DDP) in an initialized world: rank 0
    alone monitors it, and its monitor must run no collective with the others. None otherwise. Call on every rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or monitored_on_every_rank(model):
        return None
    return dist.new_group([0])


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer, Lightning's wrappers
    return inner if isinstance(inner, torch.optim.Optimizer) else None


class StepGate:
    """Whether an optimizer really stepped since the last :meth:`take` (post-step hooks on each optimizer)."""

    def __init__(self) -> None:
        self._stepped = False
        self._handles: list[Any] = []

    def hook(self, optimizers: Iterable[Any]) -> list[Any]:
        """Hook every torch optimizer among ``optimizers`` (wrappers unwrapped); the handles."""
        self.remove()
        for optimizer in optimizers:
            inner = _torch_optimizer(optimizer)
            if inner is not None:
                self._handles.append(inner.register_step_post_hook(self._on_step))
        return list(self._handles)

    @property
    def hooked(self) -> bool:
        return bool(self._handles)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = True

    def take(self) -> bool:
        """True once per batch of real optimizer steps (then reset)."""
        stepped, self._stepped = self._stepped, False
        return stepped

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class AdapterCore:
    """One adapter's monitor across ``fit()`` / ``train()`` calls and checkpoints (never raises into training).

    Args:
        run_dir: the run store.
        config: what to measure (``every_n_steps`` counts real optimizer steps).
        prefix, log_groups: the logged scalars' first key component, and the groups logged (None: all).
        run_name, metadata: recorded in the store.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: MonitorConfig,
        prefix: str = "compass",
        log_groups: Sequence[str] | None = None,
        run_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = os.fspath(run_dir)
        self.config = config
        self.prefix = prefix
        self.log_groups = None if log_groups is None else tuple(log_groups)
        self.run_name = run_name
        self.metadata = dict(metadata or {})
        self.monitor: CompassMonitor | None = None
        self.gate = StepGate()
        self._earlier: CompassMonitor | None = None  # the monitor of an earlier fit()/train() of this adapter
        self._logged_step: int | None = None
        self._warned_other_run = False

    # -- start ---------------------------------------------------------------------------
    def start(
        self,
        model: nn.Module,
        *,
        metadata: dict[str, Any],
        optimizers: Sequence[Any] = (),
        framework_step: int = 0,
        checkpoint: dict[str, Any] | None = None,
        create: bool = True,
    ) -> CompassMonitor | None:
        """Create or continue the monitor and hook the optimizers; None (logged) if it cannot. Never raises.

        Args:
            model: the model as the framework holds it (wrappers are seen through).
            metadata: framework facts recorded in the store.
            optimizers: the training optimizers (their real steps count; their
                param groups decide which parameters are frozen).
            framework_step: the framework's optimizer step at this start (0 for a fresh loop).
            checkpoint: the monitor state a framework checkpoint holds (:func:`monitor_state`).
            create: False on ranks that do not monitor (a whole model on ranks > 0): only the gate is hooked.
        """
        self.gate.hook(optimizers)
        self.monitor = None
        try:
            group = _solo_group(model)  # on every rank: creating a process group is collective
        except Exception as exc:  # noqa: BLE001 - never raise into training
            log.error("compass-monitor: this run is not monitored: %s: %s", type(exc).__name__, exc)
            return None
        if not create:
            return None
        try:
            self.monitor = self._create(model, {**metadata, **self.metadata}, optimizers, framework_step, checkpoint, group)
        except Exception as exc:  # the monitor never takes training down
            log.error(
                "compass-monitor: this run is not monitored: %s: %s. Training continues; fix the cause (the "
                "message says what) and start again to monitor it.",
                type(exc).__name__,
                exc,
            )
            return None
        for handle in self.gate._handles:
            self.monitor.own_hook(handle)
        self._logged_step = self.monitor.latest_step  # a continued run's last snapshot was logged before
        return self.monitor

    def _create(
        self,
        model: nn.Module,
        metadata: dict[str, Any],
        optimizers: Sequence[Any],
        framework_step: int,
        checkpoint: dict[str, Any] | None,
        group: Any = None,
    ) -> CompassMonitor:
        groups = [g for o in optimizers if (inner := _torch_optimizer(o)) is not None for g in inner.param_groups]
        optimizer = SimpleNamespace(param_groups=groups) if groups else None
        kwargs: dict[str, Any] = dict(config=self.config, run_name=self.run_name, metadata=metadata, optimizer=optimizer, group=group)
        earlier, self._earlier = self._earlier, None
        if checkpoint is not None:  # a checkpoint of this run: the resume rules at its step
            return CompassMonitor(model, self.run_dir, resume=True, resume_step=int(checkpoint["step"]), **kwargs)
        if earlier is not None:
            # An earlier fit()/train() in this process wrote the store: the weights have taken earlier.step real
            # steps from W0. A framework step behind it went back (a checkpoint was loaded): resume rules there.
            step = earlier.step if framework_step == 0 or framework_step >= earlier.step else framework_step
            if earlier.enabled:
                earlier.close()
            log.info("compass-monitor: continuing %s at optimizer step %d", self.run_dir, step)
            return CompassMonitor(model, self.run_dir, resume=True, resume_step=step, **kwargs)
        return CompassMonitor(model, self.run_dir, **kwargs)

    # -- steps and logging -------------------------------------------------------------
    def step(self) -> bool:
        """One real optimizer step if the gate saw one (the monitor counts it, snapshots if due); whether it did."""
        if not self.gate.take():
            return False
        if self.monitor is not None:
            self.monitor.on_optimizer_step()
        return True

    def new_scalars(self) -> dict[str, float] | None:
        """The latest snapshot's scalars if they were not handed out yet (once per snapshot), else None."""
        monitor = self.monitor
        if monitor is None or monitor.latest_step is None or monitor.latest_step == self._logged_step:
            return None
        self._logged_step = monitor.latest_step
        return select_groups(monitor.latest_scalars(prefix=self.prefix), self.log_groups)

    # -- checkpoints and the end ---------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any] | None:
        """The monitor's state for a framework checkpoint (None without a monitor). Never raises."""
        if self.monitor is None:
            return None
        try:
            return monitor_state(self.monitor)
        except Exception as exc:  # noqa: BLE001 - a checkpoint must not fail for the monitor
            log.error("compass-monitor: monitor state not saved with this checkpoint: %s", exc)
            return None

    def same_run(self, checkpoint_run_dir: str | None) -> bool:
        """Whether a checkpoint's monitor wrote this adapter's run store; warns (once) when not."""
        if checkpoint_run_dir is None or os.path.abspath(checkpoint_run_dir) == os.path.abspath(self.run_dir):
            return True
        if not self._warned_other_run:
            self._warned_other_run = True
            log.warning(
                "compass-monitor: the checkpoint's monitor wrote to %s, this one to %s: starting a new run whose "
                "base W0 is the checkpoint's weights (pass the same run_dir to continue that run instead)",
                checkpoint_run_dir,
                self.run_dir,
            )
        return False

    def interrupted(self) -> None:
        """Training stopped with an error: commit what was measured, keep the store ``running`` (a resume continues it)."""
        self.gate.remove()
        if self.monitor is not None:
            if self.monitor.enabled:
                self.monitor.flush()
            self._earlier = self.monitor

    def finish(self) -> None:
        """End of ``fit()``/``train()``: the last snapshot, the store finalized; a later call continues it."""
        self.gate.remove()
        if self.monitor is not None:
            self.monitor.close()
            self._earlier = self.monitor
