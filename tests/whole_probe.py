"""The probe on one whole matrix in one process (world size 1), for per-matrix tests.

``capture_base`` / ``measure`` run exactly the monitor's production path
(``ShardProbe`` over a one-shard layout, ``matrix_probe.measure_range``) and
return what the tests compare with their numpy references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compass_monitor import MonitorConfig
from compass_monitor.matrix_probe import ShardState, measure_range
from compass_monitor.probe import ShardProbe
from compass_monitor.sharding import LocalShard, ShardLayout, _whole


@dataclass(frozen=True)
class Measurement:
    counts: torch.Tensor  # (6,) int64
    rows: torch.Tensor  # (m,) int32
    cols: torch.Tensor  # (n,) int32
    packed: torch.Tensor  # (nbytes,) uint8


def capture_base(spec, weight: torch.Tensor, *, rank: int, alpha: float):
    """(state, class_counts (4, precision_null.NUM_CLASSES), fingerprint (2,), nonfinite count) of one whole matrix."""
    config = MonitorConfig(principal_rank=rank, alpha=alpha, include_embeddings=True)
    probe = ShardProbe(ShardLayout(shards=[_whole(spec, weight)], kind="plain"), config)
    base = probe.capture_base()
    state = probe.states[0]
    state.base_bits = state.base_bits.view(spec.shape)  # (m, n) for the tests' references; measure() flattens
    return state, torch.from_numpy(base.class_counts[0]), torch.from_numpy(base.fingerprints[0]), torch.tensor(int(base.nonfinite[0]))


def measure(state: ShardState, weight: torch.Tensor, *, backend: str = "auto") -> Measurement:
    """One snapshot of ``weight`` against the state's base; the state's previous mask becomes this one."""
    shard: LocalShard = _whole(state.shard.spec, weight)
    probe_state = ShardState(shard=shard, start=0, numel=state.numel, base_bits=state.base_bits.reshape(-1), reference_packed=state.reference_packed, previous_packed=state.previous_packed, fused=state.fused)
    counts, rows, cols, packed = measure_range(probe_state, state.shard.spec.shape, backend=backend)
    state.previous_packed, state.fused = packed, probe_state.fused
    as_tensor = lambda x: x if isinstance(x, torch.Tensor) else torch.from_numpy(x)  # noqa: E731
    return Measurement(counts=as_tensor(counts).cpu(), rows=as_tensor(rows).cpu(), cols=as_tensor(cols).cpu(), packed=as_tensor(packed).cpu())
