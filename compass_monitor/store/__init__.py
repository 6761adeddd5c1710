"""The run store: a Zarr v3 group per run (layout in ``docs/store-schema.md``)."""

from .async_writer import AsyncWriter
from .reader import ParamInfo, Run, open_run
from .schema import NotARunError, ResumeError, SchemaVersionError, StoreError, StoreExistsError
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
    "StoreError",
    "StoreExistsError",
    "open_run",
]
