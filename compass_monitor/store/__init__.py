"""The run store: a Zarr v3 group per run (layout in ``docs/store-schema.md``)."""

from .async_writer import AsyncWriter
from .reader import ParamInfo, Run, open_run
from .schema import (
    NotARunError,
    ResumeError,
    SchemaVersionError,
    StoreDamagedError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
)
from .writer import RunWriter, SnapshotRecord

__all__ = [
    "AsyncWriter",
    "NotARunError",
    "ParamInfo",
    "ResumeError",
    "Run",
    "RunWriter",
    "SchemaVersionError",
    "SnapshotRecord",
    "StoreDamagedError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "open_run",
]
