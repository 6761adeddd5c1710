"""verl 0.9: a ``verl.plugins`` entry point that monitors the actor's weights.

verl imports every ``verl.plugins`` entry point in every process (driver and
Ray workers). Installing compass-monitor registers this module as one
(``pyproject.toml``: ``[project.entry-points."verl.plugins"]``), so a verl run
is monitored by setting one environment variable, with no change to the
training script or its config::

    export COMPASS_MONITOR_RUN_DIR=/data/runs/grpo-qwen     # activates the plugin
    export COMPASS_MONITOR_CONFIG='{"every_n_steps": 10}'   # optional MonitorConfig fields (JSON)
    export COMPASS_MONITOR_VERL_READ=auto                   # optional: auto | module | export (see below)
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
* Reading the weights. With a core that has sharded support
  (``compass_monitor.probe``), the monitor is built on every rank
  from ``engine.module`` (FSDP2 DTensor / FSDP1 shards: each rank measures its
  local rows, the core combines them with collectives, rank 0 writes), so an
  actor on any number of ranks is monitored. Without it, the weights are read
  through ``engine.get_per_tensor_param_shard()``, each rank's local bf16 shard
  with its ``ShardSpec``, placed with
  ``verl.workers.engine.spec.derive_dtensor_placement``; each monitored shard
  must then be the whole tensor (one training rank), and an actor on several
  ranks is refused on every rank, without any collective, with a logged error.
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
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig

from ._resume import create_or_resume, monitor_state
from ._sharding import UnsupportedShardingError, core_supports_sharding

__all__ = ["ENV_CONFIG", "ENV_RUN_DIR", "VerlSession", "build_proxy", "patch_training_worker", "whole_local_tensors"]

log = logging.getLogger("compass_monitor.verl")

ENV_RUN_DIR = "COMPASS_MONITOR_RUN_DIR"
ENV_CONFIG = "COMPASS_MONITOR_CONFIG"
ENV_MODEL_TYPES = "COMPASS_MONITOR_MODEL_TYPES"  # comma-separated; default "language_model" (the actor)
ENV_READ = "COMPASS_MONITOR_VERL_READ"  # "auto" (default), "module" (the core reads engine.module), "export"
STATE_FILE = "compass_monitor.json"
_TARGET = "verl.workers.engine_workers"
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# -- reading the actor's weights --------------------------------------------------
def whole_local_tensors(shards: Iterable[tuple[str, torch.Tensor, Any]], *, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """``{name: tensor in its full shape}`` from ``engine.get_per_tensor_param_shard()``'s generator.

    Every tensor this process holds must be the whole parameter (unsharded,
    replicated, or a one-rank shard); ``wanted`` limits which are kept (the
    rest are dropped as the generator yields them).

    Raises:
        UnsupportedShardingError: a parameter's local block is part of the tensor.
    """
    from verl.workers.engine.spec import BlockPlacement, derive_dtensor_placement

    out: dict[str, torch.Tensor] = {}
    for name, local, spec in shards:
        if wanted is not None and name not in wanted:
            continue
        full_shape = tuple(spec.full_shape)
        if getattr(spec, "place", None) is None:
            place, _, _ = derive_dtensor_placement(spec)
        else:
            place = spec.place
        whole = local.numel() == _numel(full_shape) and (
            place == 0 or (isinstance(place, BlockPlacement) and tuple(place.local_shape) == full_shape)
        )
        if not whole:
            raise UnsupportedShardingError(
                f"compass-monitor cannot watch this verl actor: {name} is sharded across ranks "
                f"(local {tuple(local.shape)} of {full_shape}). The core compares whole matrices on one process; "
                "sharded support (local shard + global offset) is not in the core yet. Train the actor on one "
                "rank, or unset COMPASS_MONITOR_RUN_DIR for this run."
            )
        out[name] = local.reshape(full_shape)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _plain_class(module: nn.Module) -> type[nn.Module]:
    """The module's own class, not FSDP2's dynamic ``FSDP<Class>`` subclass."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed"):
            return cls
    return nn.Module


def build_proxy(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with the names and module classes of ``module`` that holds ``tensors`` as parameters.

    The core selects parameters by module class (Linear, Embedding, *Norm) and
    name; the proxy gives it that view of the engine's (wrapped, sharded)
    module. Its parameters are rebound to fresh tensors (``param.data = ...``)
    before each snapshot, so the monitor always reads the current weights.
    """
    classes = {_clean(name): _plain_class(sub) for name, sub in module.named_modules()}
    root = nn.Module()
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = root
        path = []
        for part in owner_name.split(".") if owner_name else []:
            path.append(part)
            child = owner._modules.get(part)
            if child is None:
                cls = classes.get(".".join(path), nn.Module)
                child = cls.__new__(cls)
                nn.Module.__init__(child)
                owner.add_module(part, child)
            owner = child
        owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    return root


# -- one monitored worker -------------------------------------------------------------
class VerlSession:
    """The monitor of one verl ``TrainingWorker`` (the actor) in this process."""

    def __init__(self, worker: Any, *, run_dir: str, config: MonitorConfig, resume: dict[str, Any] | None = None) -> None:
        self.engine = worker.engine
        self.every = config.every_n_steps
        self._reported: int | None = None
        self._params: dict[str, nn.Parameter] = {}
        module = getattr(self.engine, "module", None)
        metadata = {"framework": "verl", "verl": _verl_version(), "model_type": worker.config.model_type}
        read = os.environ.get(ENV_READ, "auto")
        if read not in ("auto", "module", "export"):
            raise ValueError(f"{ENV_READ} must be auto, module or export, got {read!r}")
        if read == "module" or (read == "auto" and core_supports_sharding()):
            # The core reads each rank's shards of the engine's module itself (one monitor per rank).
            self.monitor: CompassMonitor = create_or_resume(
                module, run_dir, config=config, run_name=None, metadata=metadata, state=resume
            )
        else:
            self.monitor = self._monitor_through_export(module, run_dir, config, metadata, resume)
        self._reported = self.monitor.latest_step
        self.monitor.own_hook(self.engine.optimizer.register_step_post_hook(self._on_step))

    def _monitor_through_export(
        self, module: nn.Module, run_dir: str, config: MonitorConfig, metadata: dict[str, Any], resume: dict[str, Any] | None
    ) -> CompassMonitor:
        """A monitor over a proxy of whole tensors from ``engine.get_per_tensor_param_shard()`` (one rank)."""
        shards = self._export()
        probe = build_proxy(module, {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in shards.items()})
        from compass_monitor.selection import select_parameters

        self.names = [spec.name for spec, _ in select_parameters(probe, config)]
        proxy = build_proxy(module, {n: shards[n] for n in self.names})
        del shards
        monitor = create_or_resume(proxy, run_dir, config=config, run_name=None, metadata=metadata, state=resume)
        self._params = dict(proxy.named_parameters())
        return monitor

    def _export(self, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
        generator, _ = self.engine.get_per_tensor_param_shard()
        return whole_local_tensors(generator, wanted=wanted)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        monitor = self.monitor
        if not monitor.enabled:
            return
        if self._params and (monitor.step + 1) % self.every == 0:  # the export path: read fresh weights first
            try:
                fresh = self._export(set(self.names))
                for name, param in self._params.items():
                    param.data = fresh[name]
            except Exception as exc:  # never take training down
                log.error("compass-monitor: cannot read the actor's weights (%s); monitor off for this run", exc)
                monitor.close()
                return
        monitor.on_optimizer_step()

    def new_scalars(self) -> dict[str, float]:
        """Scalars of a snapshot taken since the last call (``{}`` if none)."""
        latest = self.monitor.latest_step
        if latest is None or latest == self._reported:
            return {}
        self._reported = latest
        return self.monitor.latest_scalars()

    def state(self) -> dict[str, Any]:
        return monitor_state(self.monitor)

    def close(self) -> None:
        self.monitor.close()


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


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


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
                with open(os.path.join(local_path, STATE_FILE), "w", encoding="utf-8") as handle:
                    json.dump(session.state(), handle)
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
            world = _world_size()
            reads_module = os.environ.get(ENV_READ, "auto") == "module" or (
                os.environ.get(ENV_READ, "auto") == "auto" and core_supports_sharding()
            )
            if world > 1 and not reads_module:
                # Decided without any collective, the same way on every rank.
                raise UnsupportedShardingError(
                    f"compass-monitor cannot watch this verl actor: it trains on {world} ranks, which shard it "
                    "(FSDP), and this compass-monitor core compares whole matrices on one process (it has no sharded "
                    "support). Monitoring is off for this run."
                )
            session = VerlSession(worker, run_dir=run_dir, config=config, resume=getattr(worker, "_compass_resume", None))
    except UnsupportedShardingError as exc:
        log.error("%s", exc)
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
