"""compass-monitor: live bf16 update masks and the paper's diagnostics for training runs.

The core (this package, without ``integrations`` and ``tui``) imports no
training framework and no Textual. The classes that need torch
(``CompassMonitor``, ``ParamSpec``, ``SelectionError``, the sharding types) are imported on first
use, so that readers of a run store (the CLI's ``summary``/``inspect``, the
TUI) start without loading torch; the store's names (zarr) are imported on
first use too, so that a command that refuses to start answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .config import ConfigError, MonitorConfig
from .matrix_spec import MatrixSpec

if TYPE_CHECKING:
    from .store import NotARunError, ParamInfo, ResumeError, Run, SchemaVersionError, StoreDamagedError, StoreError, StoreExistsError, StoreLockedError, open_run
    from .store.spectral_arrays import SpectralDetail
    from .monitor import CompassMonitor
    from .selection import ParamSpec, SelectionError
    from .sharding import LocalShard, ShapeChangedError, ShardingError, ShardLayout

_LAZY = {
    **dict.fromkeys(
        ("NotARunError", "ParamInfo", "ResumeError", "Run", "SchemaVersionError", "StoreDamagedError", "StoreError", "StoreExistsError", "StoreLockedError", "open_run"),
        ".store",
    ),
    "CompassMonitor": ".monitor",
    "ParamSpec": ".selection",
    "SelectionError": ".selection",
    "SpectralDetail": ".store.spectral_arrays",
    "LocalShard": ".sharding",
    "ShardLayout": ".sharding",
    "ShardingError": ".sharding",
    "ShapeChangedError": ".sharding",
}

__all__ = [
    "CompassMonitor",
    "ConfigError",
    "LocalShard",
    "MatrixSpec",
    "MonitorConfig",
    "NotARunError",
    "ParamInfo",
    "ParamSpec",
    "ResumeError",
    "Run",
    "SchemaVersionError",
    "SelectionError",
    "ShapeChangedError",
    "ShardLayout",
    "ShardingError",
    "SpectralDetail",
    "StoreDamagedError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "__version__",
    "open_run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compass_monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
