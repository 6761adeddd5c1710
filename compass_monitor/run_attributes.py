"""The attributes a new run store starts with: the run's facts, configuration, methods, versions.

Recorded once at creation (``store.writer.RunWriter.create``), so that every
store says how its numbers were computed and by which versions.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__ as _version
from .config import MonitorConfig
from .sharding import ShardLayout
from .store import schema

__all__ = ["METHODS", "run_attributes", "model_class_of"]

METHODS = {
    "changed": "bitwise bf16 inequality, +0 == -0, NaN always changed (paper Def. 2.1, App. D.2)",
    "principal_mask": "top-alpha of |rank-k reconstruction of W0|: top-k eigenvectors (float64 eigh) of the exact fixed-point Gram matrix of the smaller side, projection in float64 chunks of 256 global rows, selected in float64; identical bits on any number of ranks (compass_monitor.principal); exact count floor(alpha*n), ties by lowest flat index",
    "low_mask": "bottom-alpha of |W0|, exact count floor(alpha*n), ties by lowest flat index",
    "precision_null": "i.i.d. Gaussian noise added to the original W0, sized to flip |M| bf16 values in expectation; closed form over classes of bf16 spacing x position of W0 in its rounding cell (layout and on-/off-grid case: attributes of base/class_counts)",
}


def versions() -> dict[str, str]:
    import zarr

    return {
        "compass_monitor": _version,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "python": platform.python_version(),
    }


def model_class_of(model: nn.Module) -> str:
    """The class of the model as the user built it (not FSDP's wrapper or FSDP2's dynamic subclass)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            return type(model.module).__name__
        if isinstance(model, FSDPModule):
            for cls in type(model).__mro__[1:]:
                if not issubclass(cls, FSDPModule):
                    return cls.__name__
    except ImportError:  # pragma: no cover
        pass
    return type(model).__name__



def run_attributes(
    run_dir: str | os.PathLike[str],
    *,
    run_name: str | None,
    metadata: dict[str, Any] | None,
    model_class: str,
    config: MonitorConfig,
    world_size: int,
    layout: ShardLayout,
) -> dict[str, Any]:
    """The new store's attributes (JSON-serialisable)."""
    return {
        "run": {
            "name": run_name or os.path.basename(os.path.abspath(os.fspath(run_dir))),
            "created": time.time(),
            "model_class": model_class,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "world_size": world_size,
            "sharding": layout.kind,
        },
        "config": config.to_dict(),
        "methods": METHODS,
        "count_fields": list(schema.COUNT_FIELDS),
        "reference_masks": list(schema.REFERENCE_MASKS),
        "versions": versions(),
        "metadata": metadata or {},
        "selection": dict(layout.facts),
    }
