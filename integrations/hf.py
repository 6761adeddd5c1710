"""Hugging Face Trainer (and TRL trainers built on it): a ``TrainerCallback``.

One line after building the trainer you already use (``Trainer``, TRL's
``SFTTrainer``, ``GRPOTrainer``, ...)::

    from compass_monitor.integrations.hf import watch
    trainer = GRPOTrainer(model=..., args=..., reward_funcs=..., train_dataset=...)
    watch(trainer, "runs/grpo", config=MonitorConfig(every_n_steps=10))
    trainer.train()

``watch`` puts a :class:`CompassTrainerCallback` at the front of the trainer's
callbacks, so that the scalars it adds to a step's logs reach every
``report_to`` integration (TensorBoard, wandb, MLflow, ...), the console and
``trainer.state.log_history``. Passing the callback as
``Trainer(callbacks=[CompassTrainerCallback(...)])`` monitors the same way, but
the Trainer runs such callbacks after its reporting integrations, so there the
scalars reach only ``trainer.state.log_history`` (a warning says so once).

What it does, event by event:

* ``on_train_begin``: refuses models sharded in a way the installed core
  cannot measure (DeepSpeed ZeRO-3; FSDP / FSDP2 without the core's sharded
  support); binds the parameters and takes the base W0 (a resumed run continues
  its run store instead); hooks the optimizer inside accelerate's wrapper
  (``kwargs["optimizer"].optimizer``) with ``register_step_post_hook``.
* ``on_step_end`` (once per optimizer step, after gradient accumulation): one
  monitor step if the optimizer really stepped (a step that the ``GradScaler``
  skipped does not count); on a snapshot step it asks the Trainer to log
  (``control.should_log``) and keeps the snapshot's scalars for that log.
  The last step of training always gets a snapshot, so its scalars are logged.
* ``on_log``: adds the pending scalars (``compass/...``) to the logs dict.
* ``state()`` (``ExportableState``): the step counter and the monitor's state
  go into each checkpoint's ``trainer_state.json``; ``trainer.train(
  resume_from_checkpoint=...)`` continues the same run store from there.
* ``on_train_end``: the store is finalized.

A whole model (one device, DDP) is monitored by the world's process zero only;
a sharded one (FSDP, FSDP2) by a monitor on every process, which the core keeps
in step with collectives (process zero writes). Every process counts steps and
asks for the same logs, so the Trainer's collectives stay in step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from compass_monitor import CompassMonitor, MonitorConfig

from ._resume import create_or_resume, monitor_state, select_groups
from ._sharding import UnsupportedShardingError, core_supports_sharding, monitor_on_every_rank

__all__ = ["CompassTrainerCallback", "UnsupportedShardingError", "watch"]

log = logging.getLogger(__name__)


class CompassTrainerCallback(TrainerCallback, ExportableState):
    """Monitors where the model's bf16 weights change, every N real optimizer steps of a ``Trainer``.

    Args:
        run_dir: a new or empty directory for the run store (on resume: the
            store the checkpointed run wrote).
        config: what to measure and how often (``every_n_steps`` counts real
            optimizer steps); a dict of ``MonitorConfig`` fields is accepted.
        log_scalars: add each snapshot's scalars to the Trainer's logs.
        prefix: first component of the logged keys.
        log_groups: only these groups' scalars (e.g. ``("all_linear",)`` for the
            global numbers alone); default: all of them (``all_linear`` and each
            module type).
        run_name, metadata: recorded in the store (see :class:`CompassMonitor`).

    Raises:
        UnsupportedShardingError: the Trainer shards parameters (FSDP, DeepSpeed
            ZeRO-3); sharded support is not in the core yet.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: MonitorConfig | dict[str, Any] | None = None,
        log_scalars: bool = True,
        prefix: str = "compass",
        log_groups: Sequence[str] | None = None,
        run_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = os.fspath(run_dir)
        self.config = MonitorConfig(**config) if isinstance(config, dict) else (config or MonitorConfig())
        self.log_scalars = log_scalars
        self.prefix = prefix
        self.log_groups = None if log_groups is None else tuple(log_groups)
        self.run_name = run_name
        self.metadata = metadata
        self.monitor: CompassMonitor | None = None
        self.step = 0  # real optimizer steps, counted on every process
        self._stepped = False
        self._hooked = False
        self._pending: dict[str, float] | None = None
        self._resume_from: dict[str, Any] | None = None  # set by the Trainer when it restores callback states
        self._first_in_line = False  # set by watch(): runs before the reporting integrations
        self._handle: Any = None

    # -- set-up --------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        _check_args(args)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_args(args)
        every_rank = monitor_on_every_rank(model, where="this Trainer's model")
        resume = self._resume_from if self._resume_from is not None else self._stored_state(state)
        self._resume_from = None
        # transformers indexes stateful_callbacks by class name at every save; a checkpoint written without
        # this callback lacks the entry.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        self.step = int(resume["step"]) if resume else 0
        if self.log_scalars and not self._first_in_line and _reporters(args):
            log.warning(
                "compass-monitor: scalars go to trainer.state.log_history but not to %s: the Trainer calls "
                "callbacks passed as Trainer(callbacks=...) after its reporting integrations. Attach with "
                "compass_monitor.integrations.hf.watch(trainer, ...) to log them there.",
                _reporters(args),
            )
        if state.is_world_process_zero or every_rank:
            metadata = {"framework": "transformers", "transformers": transformers.__version__, **(self.metadata or {})}
            self.monitor = create_or_resume(
                model,
                self.run_dir,
                config=self.config,
                run_name=self.run_name,
                metadata=metadata,
                state=resume.get("monitor") if resume else None,
            )
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        if isinstance(inner, torch.optim.Optimizer):
            handle = inner.register_step_post_hook(self._on_optimizer_step)
            self._hooked = True
            if self.monitor is not None:
                self.monitor.own_hook(handle)
            self._handle = handle

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepped = True

    def _stored_state(self, state) -> dict[str, Any] | None:
        if state.global_step == 0:
            return None
        stored = state.stateful_callbacks.get(type(self).__name__)
        for entry in stored if isinstance(stored, list) else [stored]:
            if not entry:
                continue
            if os.path.abspath(entry.get("args", {}).get("run_dir", "")) != os.path.abspath(self.run_dir):
                log.warning(
                    "compass-monitor: the checkpoint's monitor wrote to %s, this one to %s: starting a new run "
                    "whose base W0 is the checkpoint's weights",
                    entry.get("args", {}).get("run_dir"),
                    self.run_dir,
                )
                continue
            return entry.get("attributes", {}).get("_resume_from")
        return None

    # -- steps -----------------------------------------------------------------------
    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        stepped = self._stepped if self._hooked else not getattr(optimizer, "step_was_skipped", False)
        self._stepped = False
        if not stepped:
            return
        self.step += 1
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        due = self.step % self.config.every_n_steps == 0 or last
        monitor = self.monitor
        if monitor is not None:
            monitor.on_optimizer_step()
            if last:
                monitor.snapshot()
            if self.log_scalars and state.is_world_process_zero and monitor.enabled and monitor.latest_step == self.step:
                self._pending = select_groups(monitor.latest_scalars(prefix=self.prefix), self.log_groups)
        if due and self.log_scalars:
            control.should_log = True  # on every process: the Trainer's log gathers the loss across processes

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or logs is None or any(key.startswith("eval_") for key in logs):
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the arguments, the step count and the monitor's state."""
        resume = {"step": self.step, "monitor": monitor_state(self.monitor) if self.monitor is not None else None}
        return {
            "args": {
                "run_dir": self.run_dir,
                "config": self.config.to_dict(),
                "log_scalars": self.log_scalars,
                "prefix": self.prefix,
                "log_groups": None if self.log_groups is None else list(self.log_groups),
                "run_name": self.run_name,
                "metadata": self.metadata,
            },
            "attributes": {"_resume_from": resume},
        }


def watch(
    trainer: "transformers.Trainer",
    run_dir: str | os.PathLike[str],
    *,
    config: MonitorConfig | None = None,
    **kwargs: Any,
) -> CompassTrainerCallback:
    """Monitor ``trainer``'s model; its scalars go to every logger the trainer reports to.

    Keyword arguments go to :class:`CompassTrainerCallback`. Returns the
    callback (its ``monitor`` exists once training has begun).

    Raises:
        UnsupportedShardingError: the trainer is set up for FSDP.
    """
    _check_args(trainer.args)
    callback = CompassTrainerCallback(run_dir, config=config, **kwargs)
    callback._first_in_line = True
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def _check_args(args: Any) -> None:
    if getattr(args, "fsdp", None) and not core_supports_sharding():
        raise UnsupportedShardingError(
            "compass-monitor cannot watch a Trainer set up for FSDP (TrainingArguments.fsdp): it shards parameters "
            "across processes, and this compass-monitor core compares whole matrices on one process (it has no "
            "sharded support). Train without FSDP (single device or DDP), upgrade compass-monitor, or leave the "
            "callback out of this run."
        )


def _reporters(args: Any) -> list[str]:
    report_to = args.report_to
    if report_to in (None, "none"):
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in names if name != "none"]
