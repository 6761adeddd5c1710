"""Deterministic mask streams for the run-store tests (imported by tests and their subprocesses).

A stream is fully determined by its seed: snapshot t of matrix p is always the
same mask, so a test can check any snapshot a writer committed (also from
another process, also after the writer was killed) without a log of contents.
"""

from __future__ import annotations

import numpy as np

from compass_monitor.matrix_spec import MatrixSpec
from compass_monitor.store.schema import COUNT_FIELDS
from compass_monitor.store.writer import SnapshotRecord

#: Odd shapes on purpose: rows/columns not multiples of 8, a 1-row matrix, one byte-aligned.
SHAPES = ((37, 29), (64, 48), (1, 130), (16, 16))


def specs(shapes=SHAPES) -> list[MatrixSpec]:
    return [MatrixSpec(f"layers.{i}.proj.weight", "linear", "other", i, tuple(s), index=i) for i, s in enumerate(shapes)]


def masks(seed: int, count: int, shapes=SHAPES) -> list[list[np.ndarray]]:
    """``count`` snapshots of boolean masks (m, n) per shape: density drifts up, 0.5-8% flips per step."""
    rng = np.random.default_rng(seed)
    state = [np.zeros(s, dtype=bool) for s in shapes]
    out = []
    for _ in range(count):
        current = []
        for i, s in enumerate(shapes):
            rate = rng.uniform(0.005, 0.08)
            draw = rng.random(s)
            on = ~state[i] & (draw < rate * 1.6)
            off = state[i] & (draw < rate * 0.4)
            state[i] = state[i] ^ on ^ off
            current.append(state[i].copy())
        out.append(current)
    return out


def record(step: int, current: list[np.ndarray], previous: list[np.ndarray] | None) -> SnapshotRecord:
    """The SnapshotRecord a monitor would hand over for these masks (counts derived from them)."""
    counts = np.zeros((len(current), len(COUNT_FIELDS)), dtype=np.int64)
    for i, m in enumerate(current):
        prev = previous[i] if previous is not None else np.zeros_like(m)
        counts[i, 0] = m.sum()
        counts[i, 4] = (m ^ prev).sum()
    return SnapshotRecord(
        step=step,
        wall_time=1_700_000_000.0 + step,
        counts=counts,
        null_overlap=np.full((len(current), 3), 0.5),
        rows=[m.sum(axis=1).astype(np.int32) for m in current],
        cols=[m.sum(axis=0).astype(np.int32) for m in current],
        packed=[np.packbits(m.ravel()) for m in current],
    )


def write_base(writer, shapes=SHAPES) -> None:
    """A trivial base (fingerprints and class counts zero, empty reference masks) and base codes."""
    writer.write_base(
        fingerprints=np.zeros((len(shapes), 2), dtype=np.int64),
        class_counts=np.zeros((len(shapes), 4, 512), dtype=np.int64),
        reference_packed=[np.zeros((3, (m * n + 7) // 8), dtype=np.uint8) for m, n in shapes],
    )


def block_counts(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Reference preview: changed weights per block, by plain slicing."""
    return np.array(
        [[int(mask[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].sum()) for j in range(cols.size - 1)] for i in range(rows.size - 1)]
    )
