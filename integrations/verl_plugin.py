"""verl 0.9: a ``verl.plugins`` entry point that monitors the actor's weights.

verl imports every ``verl.plugins`` entry point in every process (driver and
Ray workers). Installing compass-monitor registers this module as one
(``pyproject.toml``: ``[project.entry-points."verl.plugins"]``), so a verl run
is monitored by setting one environment variable, with no change to the
training script or its config::

    export COMPASS_MONITOR_RUN_DIR=/data/runs/grpo-qwen     # activates the plugin
    export COMPASS_MONITOR_CONFIG='{"every_n_steps": 10}'   # optional MonitorConfig fields (JSON)
    python -m verl.trainer.main_ppo ...                     # as before

(On a multi-node Ray cluster, pass both variables to the workers through
``ray_kwargs.ray_init.runtime_env.env_vars``.)

Where it hooks (verl 0.9, the engine-worker path):
``ActorRolloutRefWorker.update_actor`` -> ``TrainingWorker.train_mini_batch``
(mini-batches x PPO epochs) -> ``TrainingWorker.train_batch`` ->
``FSDPEngine.optimizer_step``, which calls ``optimizer.step()`` only for
finite gradients (or lets ``GradScaler`` skip).

* ``TrainingWorker.train_mini_batch`` is wrapped: at the first update of a
  ``language_model`` worker (the actor; the reference model never trains, a
  critic is a ``value_model``) the monitor is created (weights are final
  there: loaded, and restored from a checkpoint). A post-step hook on
  ``engine.optimizer`` counts real optimizer steps, several per trainer step;
  on every N-th it reads the weights and snapshots. After the update, the new
  snapshot's scalars join the update's metrics, so verl's own loggers (console,
  wandb, TensorBoard, ...) show them as ``actor/compass/...``.
* Reading the weights: the monitor is built from ``engine.module``; sharded
  (FSDP2 DTensor / FSDP1), there is one monitor per rank: each measures its
  local rows, the core combines them with collectives, rank 0 writes; so an
  actor on any number of ranks is monitored (``integrations/_core.py``).
* ``TrainingWorker.save_checkpoint`` / ``load_checkpoint`` are wrapped: the
  monitor's state goes to ``<checkpoint>/compass_monitor.json``; a run resumed
  from that checkpoint continues the same run store.

The plugin never takes training down: errors are logged and the plugin turns
itself off for that worker.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
from typing import Any

import torch

from compass_monitor import CompassMonitor, MonitorConfig

from ._core import AdapterCore, monitored_on_every_rank

__all__ = ["ENV_CONFIG", "ENV_RUN_DIR", "VerlSession", "patch_training_worker"]

log = logging.getLogger("compass_monitor.verl")

ENV_RUN_DIR = "COMPASS_MONITOR_RUN_DIR"
ENV_CONFIG = "COMPASS_MONITOR_CONFIG"
ENV_MODEL_TYPES = "COMPASS_MONITOR_MODEL_TYPES"  # comma-separated; default "language_model" (the actor)
STATE_FILE = "compass_monitor.json"
_TARGET = "verl.workers.engine_workers"


# -- one monitored worker -------------------------------------------------------------
class VerlSession:
    """The monitor of one verl ``TrainingWorker`` (the actor) in this process."""

    def __init__(self, worker: Any, *, run_dir: str, config: MonitorConfig, resume: dict[str, Any] | None = None) -> None:
        self.engine = worker.engine
        module = getattr(self.engine, "module", None)
        self.core = AdapterCore(run_dir, config=config)
        # Sharded (FSDP1/FSDP2): a monitor on every rank, in step by collectives; whole: rank 0 alone.
        every_rank = monitored_on_every_rank(module)
        monitor = self.core.start(
            module,
            metadata={"framework": "verl", "verl": _verl_version(), "model_type": worker.config.model_type},
            optimizers=[self.engine.optimizer],
            checkpoint=resume,
            create=every_rank or _rank() == 0,
        )
        if monitor is not None:  # every real optimizer step counts (several per trainer step)
            monitor.own_hook(self.engine.optimizer.register_step_post_hook(self._on_step))

    @property
    def monitor(self) -> CompassMonitor | None:
        return self.core.monitor

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.core.monitor is not None:
            self.core.monitor.on_optimizer_step()

    def new_scalars(self) -> dict[str, float]:
        """Scalars of a snapshot taken since the last call (``{}`` if none)."""
        return self.core.new_scalars() or {}

    def state(self) -> dict[str, Any] | None:
        return self.core.checkpoint_state()

    def close(self) -> None:
        self.core.finish()


def _verl_version() -> str:
    try:
        import verl

        return str(verl.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


def _settings() -> tuple[str, MonitorConfig, set[str]] | None:
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir:
        return None
    fields = json.loads(os.environ.get(ENV_CONFIG) or "{}")
    types = {t.strip() for t in os.environ.get(ENV_MODEL_TYPES, "language_model").split(",") if t.strip()}
    return run_dir, MonitorConfig(**fields), types


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


# -- patching TrainingWorker -------------------------------------------------------------
def patch_training_worker(cls: type) -> type:
    """Wrap ``train_mini_batch``, ``save_checkpoint`` and ``load_checkpoint`` of verl's ``TrainingWorker``.

    The wrappers keep the originals' attributes (``functools.wraps``), which
    carry verl's dispatch registration. Idempotent.
    """
    if getattr(cls, "_compass_patched", False):
        return cls
    original_update = cls.train_mini_batch
    original_save = cls.save_checkpoint
    original_load = cls.load_checkpoint

    @functools.wraps(original_update)
    def train_mini_batch(self, data, *args, **kwargs):
        session = _session(self)
        output = original_update(self, data, *args, **kwargs)
        if session is not None and output is not None:
            try:
                scalars = session.new_scalars()
                if scalars:
                    from verl.utils import tensordict_utils as tu

                    tu.get(output, "metrics").update(scalars)
            except Exception as exc:  # noqa: BLE001 - never take training down
                log.warning("compass-monitor: could not add scalars to verl's metrics: %s", exc)
        return output

    @functools.wraps(original_save)
    def save_checkpoint(self, local_path, *args, **kwargs):
        result = original_save(self, local_path, *args, **kwargs)
        session = getattr(self, "_compass_session", None)
        if session and _rank() == 0 and local_path:
            try:
                state = session.state()
                if state is not None:
                    with open(os.path.join(local_path, STATE_FILE), "w", encoding="utf-8") as handle:
                        json.dump(state, handle)
            except Exception as exc:  # noqa: BLE001
                log.warning("compass-monitor: could not save its state with the checkpoint: %s", exc)
        return result

    @functools.wraps(original_load)
    def load_checkpoint(self, local_path, *args, **kwargs):
        result = original_load(self, local_path, *args, **kwargs)
        path = os.path.join(local_path or "", STATE_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                self._compass_resume = json.load(handle)
        return result

    cls.train_mini_batch = train_mini_batch
    cls.save_checkpoint = save_checkpoint
    cls.load_checkpoint = load_checkpoint
    cls._compass_patched = True
    return cls


def _session(worker: Any) -> VerlSession | None:
    """The worker's session, created at its first update; None where the plugin is off."""
    if "_compass_session" in worker.__dict__:
        return worker._compass_session
    session = None
    try:
        settings = _settings()
        if settings is not None and getattr(worker.config, "model_type", None) in settings[2]:
            run_dir, config, _ = settings
            session = VerlSession(worker, run_dir=run_dir, config=config, resume=getattr(worker, "_compass_resume", None))
    except Exception as exc:  # noqa: BLE001 - never take training down
        log.error("compass-monitor: not monitoring this verl run: %s: %s", type(exc).__name__, exc)
    worker._compass_session = session
    return session


# -- loading as a verl plugin ---------------------------------------------------------------
class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``TrainingWorker`` right after ``verl.workers.engine_workers`` is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            try:
                patch_training_worker(module.TrainingWorker)
            except Exception as exc:  # noqa: BLE001
                log.error("compass-monitor: could not hook verl's TrainingWorker: %s", exc)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Hook verl's TrainingWorker now or when it is imported. Does nothing without ``COMPASS_MONITOR_RUN_DIR``."""
    if not os.environ.get(ENV_RUN_DIR):
        return
    module = sys.modules.get(_TARGET)
    if module is not None:
        patch_training_worker(module.TrainingWorker)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


install()
