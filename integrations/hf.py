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

* ``on_train_begin``: binds the parameters and takes the base W0 (a resumed
  run continues its run store instead; a second ``trainer.train()`` continues
  the same store at the real optimizer step); hooks the optimizer inside
  accelerate's wrapper with ``register_step_post_hook``. A monitor that cannot
  start logs why; training is never stopped by it.
* ``on_step_end`` (once per optimizer step, after gradient accumulation): one
  monitor step if the optimizer really stepped (a step that the ``GradScaler``
  skipped does not count); on a snapshot step it asks the Trainer to log
  (``control.should_log``) and keeps the snapshot's scalars for that log.
  The last step of training always gets a snapshot, so its scalars are logged.
* ``on_log``: adds the pending scalars (``compass/...``) to the logs dict.
* ``state()`` (``ExportableState``): the step counter and the monitor's state
  go into each checkpoint's ``trainer_state.json``; ``trainer.train(
  resume_from_checkpoint=...)`` continues the same run store from there. With
  ``restore_callback_states_from_checkpoint=True`` transformers rebuilds the
  callback from that state and appends it after the reporting integrations;
  the rebuilt callback finds the trainer ``watch`` attached to (by run store)
  and moves back to the front, so its scalars keep reaching every logger.
* ``on_train_end``: the store is finalized.

A whole model (one device, DDP) is monitored by the world's process zero only;
a sharded one (FSDP, FSDP2) by a monitor on every process, which the core keeps
in step with collectives (process zero writes). Every process counts steps and
asks for the same logs, so the Trainer's collectives stay in step.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import transformers
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, ExportableState

from compass_monitor import CompassMonitor, MonitorConfig

from ._core import AdapterCore, monitored_on_every_rank

__all__ = ["CompassTrainerCallback", "watch"]

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
    """

    #: Callback handlers ``watch`` attached to, by run store: transformers rebuilds a restored callback from JSON
    #: arguments, so this process-local map is its only way back to the trainer (weak: it keeps nothing alive).
    _handlers: ClassVar[weakref.WeakValueDictionary[str, CallbackHandler]] = weakref.WeakValueDictionary()

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
        self.core = AdapterCore(
            self.run_dir, config=self.config, prefix=prefix, log_groups=log_groups, run_name=run_name, metadata=metadata
        )
        self.step = 0  # real optimizer steps, counted on every process
        self._pending: dict[str, float] | None = None
        self._resume_from: dict[str, Any] | None = None  # set by the Trainer when it restores callback states

    @property
    def monitor(self) -> CompassMonitor | None:
        """The monitor of the current (or last) training on this process; None where this process does not monitor."""
        return self.core.monitor

    # -- set-up --------------------------------------------------------------------
    def _take_front_place(self) -> bool:
        """Run before the reporting integrations (so they see the scalars); whether this callback does."""
        handler = self._handlers.get(os.path.abspath(self.run_dir))
        if handler is None or self not in handler.callbacks:
            return False
        if handler.callbacks[0] is not self:
            # A restored callback was appended last: move it to the front. Events iterate the list by index,
            # and moving the current element to the front keeps every later element's index.
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        return True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        first = self._take_front_place()
        resume = self._resume_from if self._resume_from is not None else self._stored_state(state)
        self._resume_from = None
        # transformers indexes stateful_callbacks by class name at every save; a checkpoint written without
        # this callback lacks the entry.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if resume:
            self.step = int(resume["step"])
        elif 0 < state.global_step < self.step:
            self.step = state.global_step  # an earlier train() of this callback, and the trainer's step went back
        # otherwise a second train() counts on from this callback's steps (the weights took them), on every process
        if self.log_scalars and not first and _reporters(args):
            log.warning(
                "compass-monitor: scalars go to trainer.state.log_history but not to %s: the Trainer calls "
                "callbacks passed as Trainer(callbacks=...) after its reporting integrations. Attach with "
                "compass_monitor.integrations.hf.watch(trainer, ...) to log them there.",
                _reporters(args),
            )
        try:
            every_rank: bool | None = monitored_on_every_rank(model)
        except Exception as exc:  # DeepSpeed ZeRO-3 and other layouts the core cannot read
            every_rank = None
            log.error("compass-monitor: this run is not monitored: %s", exc)
        self.core.start(
            model,
            metadata={"framework": "transformers", "transformers": transformers.__version__},
            optimizers=[optimizer] if optimizer is not None else [],
            framework_step=state.global_step,
            checkpoint=resume.get("monitor") if resume else None,
            create=every_rank is not None and (state.is_world_process_zero or every_rank),
        )

    def _stored_state(self, state) -> dict[str, Any] | None:
        if state.global_step == 0:
            return None
        stored = state.stateful_callbacks.get(type(self).__name__)
        for entry in stored if isinstance(stored, list) else [stored]:
            if entry and self.core.same_run(entry.get("args", {}).get("run_dir")):
                return entry.get("attributes", {}).get("_resume_from")
        return None

    # -- steps -----------------------------------------------------------------------
    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        gate = self.core.gate
        stepped = gate.take() if gate.hooked else not getattr(optimizer, "step_was_skipped", False)
        if not stepped:
            return
        self.step += 1
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        due = self.step % self.config.every_n_steps == 0 or last
        monitor = self.core.monitor
        if monitor is not None:
            monitor.on_optimizer_step()
            if last:
                monitor.snapshot()
            if self.log_scalars and state.is_world_process_zero:
                self._pending = self.core.new_scalars() or self._pending
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
        self.core.finish()

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the arguments, the step count and the monitor's state."""
        resume = {"step": self.step, "monitor": self.core.checkpoint_state()}
        return {
            "args": {
                "run_dir": self.run_dir,
                "config": self.config.to_dict(),
                "log_scalars": self.log_scalars,
                "prefix": self.core.prefix,
                "log_groups": None if self.core.log_groups is None else list(self.core.log_groups),
                "run_name": self.core.run_name,
                "metadata": self.core.metadata or None,
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
    callback (its ``monitor`` exists once training has begun). With
    ``restore_callback_states_from_checkpoint=True`` transformers replaces it
    by one rebuilt from the checkpoint; ``trainer.callback_handler.callbacks[0]``
    is then the live one.
    """
    callback = CompassTrainerCallback(run_dir, config=config, **kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    CompassTrainerCallback._handlers[os.path.abspath(callback.run_dir)] = trainer.callback_handler
    return callback


def _reporters(args: Any) -> list[str]:
    report_to = args.report_to
    if report_to in (None, "none"):
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in names if name != "none"]
