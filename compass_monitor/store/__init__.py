"""The run store: a Zarr v3 group per run (layout in ``docs/store-schema.md``).

The errors come from the light ``schema`` module; the reader and writers (zarr)
are imported on first use, so that a command which only refuses (no terminal,
a wrong path) answers without loading zarr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .schema import (
    NotARunError,
    ResumeError,
    SchemaVersionError,
    StoreDamagedError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
)

if TYPE_CHECKING:
    from .async_writer import AsyncWriter
    from .reader import ParamInfo, Run, open_run
    from .spectral_arrays import SpectralDetail
    from .writer import RunWriter, SnapshotRecord

_LAZY = {
    "AsyncWriter": ".async_writer",
    "ParamInfo": ".reader",
    "Run": ".reader",
    "open_run": ".reader",
    "RunWriter": ".writer",
    "SnapshotRecord": ".writer",
    "SpectralDetail": ".spectral_arrays",
}

__all__ = [
    "AsyncWriter",
    "NotARunError",
    "ParamInfo",
    "ResumeError",
    "Run",
    "RunWriter",
    "SchemaVersionError",
    "SnapshotRecord",
    "SpectralDetail",
    "StoreDamagedError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "open_run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compass_monitor.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
