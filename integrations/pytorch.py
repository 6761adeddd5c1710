"""Plain PyTorch: count real optimizer steps with ``Optimizer.register_step_post_hook``.

One line in a training loop::

    from compass_monitor.integrations.pytorch import watch
    monitor = watch(model, optimizer, "runs/my-run", config=MonitorConfig(every_n_steps=10))
    ...                     # train as usual
    monitor.close()

The post hook fires only when ``optimizer.step()`` really runs: a step that
``torch.amp.GradScaler`` skips for non-finite gradients, or that the loop skips
itself, is not counted. With gradient accumulation the optimizer steps once per
accumulated batch, so snapshots follow optimizer steps, not micro-batches.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from compass_monitor import CompassMonitor, MonitorConfig

__all__ = ["attach_optimizer", "watch"]


def attach_optimizer(monitor: CompassMonitor, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Make every real step of ``optimizer`` a step of ``monitor``.

    Attach the one optimizer whose step is the training step. The hook is
    removed when the monitor closes or disables itself.
    """

    def on_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        monitor.on_optimizer_step()

    handle = optimizer.register_step_post_hook(on_step)
    monitor.own_hook(handle)
    return handle


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_dir: str | os.PathLike[str],
    *,
    config: MonitorConfig | None = None,
    **kwargs: Any,
) -> CompassMonitor:
    """Create a monitor for ``model`` (its current weights are the base) and count ``optimizer``'s steps.

    Parameters in none of ``optimizer``'s param groups count as frozen (left
    out unless ``MonitorConfig.include_frozen``).

    Keyword arguments go to :class:`compass_monitor.CompassMonitor`.
    """
    monitor = CompassMonitor(model, run_dir, config=config, optimizer=optimizer, **kwargs)
    attach_optimizer(monitor, optimizer)
    return monitor
