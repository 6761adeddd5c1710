"""compass-monitor: live bf16 update masks and the paper's diagnostics for training runs.

The core (this package, without ``integrations`` and ``tui``) imports no
training framework and no Textual.
"""

__version__ = "0.1.0"

from .config import ConfigError, MonitorConfig
from .monitor import CompassMonitor
from .selection import ParamSpec, SelectionError
from .store import NotARunError, ParamInfo, Run, SchemaVersionError, StoreError, StoreExistsError, open_run

__all__ = [
    "CompassMonitor",
    "ConfigError",
    "MonitorConfig",
    "NotARunError",
    "ParamInfo",
    "ParamSpec",
    "Run",
    "SchemaVersionError",
    "SelectionError",
    "StoreError",
    "StoreExistsError",
    "__version__",
    "open_run",
]
