"""What a run store must satisfy before it is read, and a full check of what it holds.

Readers are bounded by what is on disk: before any array is read, the shapes
the root attributes declare (the matrices) and the shapes of the arrays'
metadata are checked against each other, and the commit's snapshot count
against every time-indexed array's length, so that a crafted or damaged store
raises :class:`~compass_monitor.store.schema.StoreDamagedError` instead of
allocating what its metadata claims (``chunks`` bounds each decompression by
the chunk's declared size). :func:`verify_run` decodes every committed
snapshot and checks each against what the snapshot itself records (mask bits
against the frame header and the stored count, row/column/preview sums against
the count): ``compass-monitor inspect`` reports what it finds, and resume
refuses a damaged store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import schema

__all__ = ["check_params", "expected_shape", "verify_run", "MAX_WEIGHTS_PER_MATRIX"]

#: Larger declared matrices are refused outright (2**36 weights: 128 GB of bf16; no model has one).
MAX_WEIGHTS_PER_MATRIX = 1 << 36


def _damaged(root: Path, what: str) -> schema.StoreDamagedError:
    return schema.StoreDamagedError(f"{root / 'zarr.json'} is damaged: {what}")


def check_params(root: Path, entries: Any) -> list[tuple[str, str, str, str, int, tuple[int, int]]]:
    """The ``params`` attribute as (id, name, role, module_type, layer, (m, n)) tuples, checked.

    Raises:
        StoreDamagedError: not a list of parameter records, a bad shape, a duplicate id.
    """
    if not isinstance(entries, list):
        raise _damaged(root, f"'params' is {type(entries).__name__}, not a list")
    out, ids = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _damaged(root, f"params[{i}] is not an object")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise _damaged(root, f"params[{i}] has shape {shape!r}, not two sizes >= 0")
        if shape[0] * shape[1] > MAX_WEIGHTS_PER_MATRIX:
            raise _damaged(root, f"params[{i}] declares a {shape[0]} x {shape[1]} matrix, beyond any model")
        pid, layer = entry.get("id"), entry.get("layer", -1)
        if pid != schema.param_id(i) or pid in ids:
            raise _damaged(root, f"params[{i}] has id {pid!r}, expected {schema.param_id(i)!r}")
        if not isinstance(layer, int):
            raise _damaged(root, f"params[{i}] has layer {layer!r}")
        ids.add(pid)
        out.append((pid, str(entry.get("name")), str(entry.get("role")), str(entry.get("module_type")), layer, (shape[0], shape[1])))
    return out


def expected_shape(path: str, shapes: dict[str, tuple[int, int]], count: int) -> tuple[int | None, ...] | None:
    """The shape an array of the store must have (None for the free time axis), or None if unknown.

    Args:
        path: the array's path in the store.
        shapes: matrix shape per parameter id.
        count: number of parameters.
    """
    fixed = {
        schema.STEPS: (None,),
        schema.TIMES: (None,),
        schema.COUNTS: (None, count, len(schema.COUNT_FIELDS)),
        schema.NULL_OVERLAP: (None, count, len(schema.REFERENCE_MASKS)),
        schema.FRAMES: (None, count, len(schema.FRAME_FIELDS)),
        schema.SPECTRAL: (None, count, len(schema.SPECTRAL_FIELDS)),
        schema.SPECTRAL_ANGLES: (None, count, len(schema.SPECTRAL_SIDES), None),  # K = spectral_k
        schema.SPECTRAL_SV: (None, count, None),
        schema.SPECTRAL_SV_BASE: (None, count, None),
        schema.BASE_FINGERPRINT: (count, 2),
        schema.BASE_CLASS_COUNTS: (count, 1 + len(schema.REFERENCE_MASKS), None),  # C = 512 or 33792 classes
    }
    if path in fixed:
        return fixed[path]
    prefix, _, pid = path.rpartition("/")
    if pid not in shapes:
        return None
    m, n = shapes[pid]
    nbytes = (m * n + 7) // 8
    return {
        schema.CHANGED_PREFIX: (None, nbytes),
        schema.ROWS_PREFIX: (None, m),
        schema.COLS_PREFIX: (None, n),
        schema.REFERENCE_PREFIX: (len(schema.REFERENCE_MASKS), nbytes),
        schema.BASE_WEIGHTS_PREFIX: (m, n),
        schema.PREVIEW_PREFIX: (None, min(schema.PREVIEW_MAX_BLOCKS, m), min(schema.PREVIEW_MAX_BLOCKS, n)),
    }.get(prefix)


def check_array_shape(root: Path, path: str, shape: tuple[int, ...], expected: tuple[int | None, ...] | None, rows: int) -> None:
    """Raise unless ``shape`` matches ``expected`` and holds at least ``rows`` rows along time.

    Raises:
        StoreDamagedError: naming the array, its shape and what the store's records say.
    """
    if expected is not None and (len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected))):
        want = "(" + ", ".join("T" if e is None else str(e) for e in expected) + ")"
        raise schema.StoreDamagedError(
            f"{root / path / 'zarr.json'} is damaged: shape {tuple(shape)}, but the store's matrices make it {want}"
        )
    if rows and shape[0] < rows:
        raise schema.StoreDamagedError(
            f"{root / schema.COMMIT_FILE} says {rows} snapshots, but {path} holds {shape[0]} rows (the store is damaged)"
        )


def verify_run(run: Any, *, limit: int = 20) -> list[str]:  # run: a reader.Run (not imported: the reader imports this module)
    """Decode every committed snapshot of ``run`` and check it against its own records.

    Returns at most ``limit`` one-line problems (empty: the store is sound). Checks: every
    chunk the commit covers exists and decodes (``chunks``); steps increase; each mask
    equals its frame's bit count and the stored ``changed`` count; row, column and preview
    sums equal that count; ``flips_since_previous`` equals the bits that differ from the
    previous stored snapshot's mask; the reference masks decode.
    """
    problems: list[str] = []

    def note(text: str) -> bool:
        problems.append(text)
        return len(problems) >= limit

    try:
        t_count = run.num_snapshots
        steps = run.steps
        if t_count and np.any(np.diff(steps) <= 0):
            bad = int(np.flatnonzero(np.diff(steps) <= 0)[0]) + 1
            if note(f"snapshot {bad}: step {int(steps[bad])} does not follow step {int(steps[bad - 1])}"):
                return problems
        counts = run.counts
        run.null_overlap, run.times, run.spectral_metrics  # noqa: B018 - read to check their chunks
        run.spectral_angles, run.spectral_singular_values, run.spectral_base_singular_values  # noqa: B018
        if t_count:  # the base is written before the first snapshot
            run.base_fingerprint, run.base_class_counts  # noqa: B018
    except schema.StoreDamagedError as exc:
        return [str(exc)]
    for p in run.params:
        try:
            for which in schema.REFERENCE_MASKS:
                run.reference_mask(p, which)
            run.base_codes(p)
            rows, cols = (run.row_counts(p), run.col_counts(p)) if t_count else (None, None)
        except schema.StoreDamagedError as exc:
            if note(str(exc)):
                return problems
            continue
        previous = np.zeros((p.numel + 7) // 8, dtype=np.uint8)
        for t in range(t_count):
            try:
                packed = run.packed_mask(p, t)
                preview = run.preview_counts(p, t)
            except schema.StoreDamagedError as exc:
                if note(str(exc)):
                    return problems
                break
            ones = int(np.bitwise_count(packed).sum(dtype=np.int64))
            changed = int(counts[t, p.index, 0])
            where = f"snapshot {t} (step {int(steps[t])}) of {p.name!r}"
            sums = {"row counts": int(rows[t].sum()), "column counts": int(cols[t].sum()), "preview": int(preview.sum())}
            wrong = [f"{k} sum to {v}" for k, v in sums.items() if v != changed]
            flips = int(counts[t, p.index, 4])
            true_flips = int(np.bitwise_count(packed ^ previous).sum(dtype=np.int64))
            if flips != true_flips:  # against the previous *stored* snapshot, gaps and resumes included
                wrong.append(f"flips_since_previous is {flips}, the masks differ at {true_flips}")
            if wrong and note(f"{where}: the mask has {ones} changed weights, the count {changed}, but " + ", ".join(wrong)):
                return problems
            previous = packed
    return problems
