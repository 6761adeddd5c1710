"""The monitor's configuration: one keyword-only dataclass, validated on creation."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .module_types import MODULE_TYPES

__all__ = ["MonitorConfig", "ConfigError"]


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """What the monitor measures and how often. Every field is recorded in the run store.

    Attributes:
        every_n_steps: snapshot every N real optimizer steps (steps that ran;
            skipped GradScaler / non-finite steps do not count).
        principal_rank: k of the principal mask, top-alpha of |rank-k SVD
            reconstruction of W0| (paper Sec. 4.2). Capped at min(m, n).
        alpha: fraction selected by the principal and low-magnitude masks
            (the random-baseline overlap).
        include_linear: monitor 2-D weights of linear layers (the default set).
        include_embeddings: also monitor embedding tables (reported separately).
        include_lm_head: also monitor an untied output head (reported separately).
        include_norms: also monitor norm weights/biases (as 1 x n matrices).
        include_biases: also monitor biases of linear layers (as 1 x n matrices).
        name_pattern: if set, only parameters whose name matches this regular
            expression (``re.search``) are monitored.
        include_frozen: also monitor frozen matrices (``requires_grad=False``, or in
            no param group of the optimizer given to the monitor); by default they
            are left out and listed in the store's ``selection`` attribute.
        module_type_map: regular expression -> module type for linear layers the
            built-in table (``compass_monitor.module_types``) does not know, e.g.
            ``{"attn.wq.weight$": "q"}``; searched in each
            parameter's name before the table, first match wins.
        snapshot_on_close: take a last snapshot at ``close()`` if the last real
            step has none yet.
        max_warnings_per_param: how many non-finite warnings one parameter may log.
        writer_queue: snapshots that may wait for the background store writer
            (each holds 1 bit per monitored weight plus row/column counts); 0
            writes synchronously in the training thread.
        when_queue_full: ``"block"`` (the training step waits for the writer;
            nothing is lost) or ``"skip"`` (the snapshot is not taken, a warning
            is logged and the gap is recorded in the store).
        key_interval: a full mask is stored every this many snapshots, XOR
            deltas in between; reading any snapshot decodes at most this many
            frames. Larger is smaller on disk, slower to seek.
        store_base: store W0's bf16 codes (2 bytes per weight before
            compression) in the run, which ``resume=True`` needs.
        base_device: where the monitor keeps W0 (2 bytes per monitored local
            weight) and the packed masks (half a bit per weight): ``"param"``
            (each parameter's device: no host transfer per snapshot) or
            ``"cpu"`` (host memory: saves accelerator memory, costs a 2-byte
            device-to-host copy of the current bf16 weights per snapshot).
        spectral_every: compute the spectral diagnostics (NSS, principal
            angles, top-k energy; paper Sec. 4.1) every this many snapshots
            (stored snapshots S, 2S, ...: counted in the store, so a resumed
            run keeps the cadence); 0 turns them off. Off by default: the base decomposition costs a
            float64 Gram eigendecomposition per matrix at start
            (``compass_monitor.spectral``).
        spectral_k: rank of the subspaces compared by principal angles and of
            the Ky Fan energy (capped at min(m, n)).
        spectral_method: ``"auto"``, ``"exact"`` or ``"perturb"`` (see
            ``compass_monitor.spectral``).
    """

    every_n_steps: int = 10
    principal_rank: int = 64
    alpha: float = 0.5
    include_linear: bool = True
    include_embeddings: bool = False
    include_lm_head: bool = False
    include_norms: bool = False
    include_biases: bool = False
    name_pattern: str | None = None
    include_frozen: bool = False
    module_type_map: dict[str, str] = field(default_factory=dict)
    snapshot_on_close: bool = True
    max_warnings_per_param: int = 1
    writer_queue: int = 2
    when_queue_full: str = "block"
    key_interval: int = 32
    store_base: bool = True
    base_device: str = "param"
    spectral_every: int = 0
    spectral_k: int = 64
    spectral_method: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be an integer >= 1, got {self.every_n_steps!r}")
        if not isinstance(self.principal_rank, int) or self.principal_rank < 1:
            raise ConfigError(f"principal_rank must be an integer >= 1, got {self.principal_rank!r}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if self.max_warnings_per_param < 0:
            raise ConfigError(f"max_warnings_per_param must be >= 0, got {self.max_warnings_per_param!r}")
        if not isinstance(self.writer_queue, int) or isinstance(self.writer_queue, bool) or self.writer_queue < 0:
            raise ConfigError(f"writer_queue must be an integer >= 0 (0 = write synchronously), got {self.writer_queue!r}")
        if self.when_queue_full not in ("block", "skip"):
            raise ConfigError(f"when_queue_full must be 'block' or 'skip', got {self.when_queue_full!r}")
        if not isinstance(self.key_interval, int) or isinstance(self.key_interval, bool) or self.key_interval < 1:
            raise ConfigError(f"key_interval must be an integer >= 1, got {self.key_interval!r}")
        if not isinstance(self.spectral_every, int) or isinstance(self.spectral_every, bool) or self.spectral_every < 0:
            raise ConfigError(f"spectral_every must be an integer >= 0 (0 = off), got {self.spectral_every!r}")
        if not isinstance(self.spectral_k, int) or isinstance(self.spectral_k, bool) or self.spectral_k < 1:
            raise ConfigError(f"spectral_k must be an integer >= 1, got {self.spectral_k!r}")
        if self.spectral_method not in ("auto", "exact", "perturb"):
            raise ConfigError(f"spectral_method must be 'auto', 'exact' or 'perturb', got {self.spectral_method!r}")
        if self.base_device not in ("param", "cpu"):
            raise ConfigError(f"base_device must be 'param' or 'cpu', got {self.base_device!r}")
        if self.name_pattern is not None:
            try:
                re.compile(self.name_pattern)
            except re.error as exc:
                raise ConfigError(f"name_pattern is not a valid regular expression: {self.name_pattern!r} ({exc})") from exc
        self._check_module_type_map()
        if not any(
            (self.include_linear, self.include_embeddings, self.include_lm_head, self.include_norms, self.include_biases)
        ):
            raise ConfigError("at least one include_* field must be True, got all False")

    def _check_module_type_map(self) -> None:
        if not isinstance(self.module_type_map, dict):
            raise ConfigError(f"module_type_map must be a dict of regex -> module type, got {self.module_type_map!r}")
        for pattern, kind in self.module_type_map.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ConfigError(f"module_type_map key {pattern!r} is not a valid regular expression ({exc})") from exc
            if kind not in MODULE_TYPES:
                raise ConfigError(f"module_type_map[{pattern!r}] = {kind!r} is not a module type; use one of {', '.join(MODULE_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (stored in the run metadata)."""
        return asdict(self)
