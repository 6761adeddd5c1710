"""The run store: a Zarr v3 group per run (layout in ``docs/store-schema.md``)."""

from .reader import ParamInfo, Run, open_run
from .schema import NotARunError, SchemaVersionError, StoreError, StoreExistsError
from .writer import RunWriter, SnapshotRecord

__all__ = [
    "NotARunError",
    "ParamInfo",
    "Run",
    "RunWriter",
    "SchemaVersionError",
    "SnapshotRecord",
    "StoreError",
    "StoreExistsError",
    "open_run",
]
