"""Snapshots share chunk files (issue 13: a long run of small matrices made ~50 files per snapshot).

The time-chunked layout (``storage.time_chunk_bytes``) must hold exactly what the one-file-per-
snapshot layout holds, read through ``open_run`` and through plain zarr, live and finished,
after a resume that drops snapshots mid-chunk, with far fewer files and no spare left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from compass_monitor.store import RunWriter, open_run, schema
from compass_monitor.store.row_chunks import SPARE_SUFFIX
from compass_monitor.store.writer import TIME_CHUNK_BYTES, time_chunk_rows
from store_stream import SHAPES, masks, record, specs, write_base

SNAPSHOTS = 70  # more than one chunk of 64 snapshots for the smallest arrays


def write(path: Path, stream, budget: int, *, upto: int | None = None, finish: bool = True) -> RunWriter:
    writer = RunWriter.create(path, params=specs(), attributes={"config": {"every_n_steps": 1}}, key_interval=8,
                              time_chunk_bytes=budget)
    write_base(writer)
    for t in range(upto if upto is not None else len(stream)):
        writer.append(record(t + 1, stream[t], stream[t - 1] if t else None))
    if finish:
        writer.finalize()
    return writer


def files(path: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(w, n), path) for w, _, names in os.walk(path) for n in names)


def chunk_files(path: Path) -> dict[str, list[str]]:
    """Chunk files of every array along time but steps and times, by array."""
    group = zarr.open_group(str(path), mode="r")
    prefixes = (schema.CHANGED_PREFIX, schema.ROWS_PREFIX, schema.COLS_PREFIX, schema.PREVIEW_PREFIX)
    names = [schema.COUNTS, schema.NULL_OVERLAP, schema.FRAMES, schema.SPECTRAL]
    names += [f"{prefix}/{schema.param_id(i)}" for prefix in prefixes for i in range(len(group.attrs["params"]))]
    return {name: [f for f in os.listdir(path / name) if f.startswith("c")] for name in names}


def everything(path: Path) -> dict[str, np.ndarray]:
    """Every array a viewer reads, through the checked reader."""
    run = open_run(path)
    out = {"steps": run.steps, "counts": run.counts, "null": run.null_overlap, "frames": run.frames()}
    for p, _ in enumerate(run.params):
        out[f"rows{p}"], out[f"cols{p}"] = run.row_counts(p), run.col_counts(p)
        for t in range(run.num_snapshots):
            out[f"mask{p}.{t}"] = run.mask(p, t)
            out[f"preview{p}.{t}"] = run.preview_counts(p, t)
    return out


def test_chunk_rows_rule():
    assert time_chunk_rows(0) == 64 and time_chunk_rows(1) == 64
    assert time_chunk_rows(1024) == 64 and time_chunk_rows(1025) == 32
    assert time_chunk_rows(TIME_CHUNK_BYTES // 2) == 2 and time_chunk_rows(TIME_CHUNK_BYTES // 2 + 1) == 1
    assert time_chunk_rows(10**9) == 1
    assert time_chunk_rows(8, budget=0) == 1  # the one-file-per-snapshot layout


def test_time_chunked_store_equals_one_file_per_snapshot(tmp_path):
    stream = masks(3, SNAPSHOTS)
    write(tmp_path / "single", stream, 0)
    write(tmp_path / "shared", stream, TIME_CHUNK_BYTES)
    single, shared = everything(tmp_path / "single"), everything(tmp_path / "shared")
    assert single.keys() == shared.keys()
    for key in single:
        np.testing.assert_array_equal(single[key], shared[key], err_msg=key)
    for t in (0, 37, SNAPSHOTS - 1):  # the stored masks are the stream's
        for p, truth in enumerate(stream[t]):
            np.testing.assert_array_equal(shared[f"mask{p}.{t}"], truth)
    # plain zarr reads the same numbers (the layout is ordinary Zarr v3 chunking)
    a, b = zarr.open_group(str(tmp_path / "single"), mode="r"), zarr.open_group(str(tmp_path / "shared"), mode="r")
    for name in (schema.COUNTS, schema.FRAMES, f"{schema.CHANGED_PREFIX}/p0001", f"{schema.ROWS_PREFIX}/p0000"):
        assert b[name].chunks[0] > 1
        np.testing.assert_array_equal(a[name][:], b[name][:])
    per_snapshot = 4 + 4 * len(SHAPES)  # counts, null, frames, spectral + 4 per matrix (steps and times: 1024 per chunk)
    single_chunks, shared_chunks = chunk_files(tmp_path / "single"), chunk_files(tmp_path / "shared")
    assert len(single_chunks) == per_snapshot
    assert all(len(c) == SNAPSHOTS for c in single_chunks.values())  # one file per snapshot and array
    for name, chunks in shared_chunks.items():  # exactly ceil(T / L) files per array
        assert len(chunks) == -(-SNAPSHOTS // b[name].chunks[0]), name
    assert sum(map(len, shared_chunks.values())) <= per_snapshot * SNAPSHOTS // 10
    assert not [f for f in files(tmp_path / "shared") if f.endswith(SPARE_SUFFIX)]  # finalize removed the spares


def test_live_reader_and_resume_mid_chunk(tmp_path):
    stream = masks(4, SNAPSHOTS)
    path = tmp_path / "run"
    writer = write(path, stream, TIME_CHUNK_BYTES, upto=40, finish=False)
    live = open_run(path)
    assert live.num_snapshots == 40
    np.testing.assert_array_equal(live.mask(1, 39), stream[39][1])
    for t in range(40, 50):
        writer.append(record(t + 1, stream[t], stream[t - 1]))
        live.refresh()
        np.testing.assert_array_equal(live.mask(2, t), stream[t][2])  # the rewritten shared chunk, read again
        np.testing.assert_array_equal(live.row_counts(0)[t], stream[t][0].sum(axis=1))
    del writer  # a crash: no finalize (spares stay behind, hidden)
    resumed = RunWriter.open_existing(path)
    resumed.resume(30, event={"step": 30})  # drops snapshots 30..49, inside the first 64-snapshot chunk
    other = masks(5, SNAPSHOTS)  # a different continuation
    for t in range(30, 45):
        resumed.append(record(t + 1, other[t], other[t - 1] if t > 30 else stream[29]))
    resumed.finalize()
    run = open_run(path)
    assert run.num_snapshots == 45 and run.steps.tolist() == list(range(1, 46))
    for t in (0, 29):
        np.testing.assert_array_equal(run.mask(3, t), stream[t][3])
    for t in (30, 44):
        np.testing.assert_array_equal(run.mask(3, t), other[t][3])
        assert run.counts[t, 3, 0] == other[t][3].sum()
    assert not [f for f in files(path) if f.endswith(SPARE_SUFFIX)]


@pytest.mark.skipif(not os.path.exists("/proc/self"), reason="Linux: the spare-exchange path")
def test_spare_files_hold_old_versions_while_running(tmp_path):
    """While a run writes, each shared chunk has one hidden spare; readers never list it as a chunk."""
    stream = masks(6, 10)
    writer = write(tmp_path / "run", stream, TIME_CHUNK_BYTES, finish=False)
    spares = [f for f in files(tmp_path / "run") if f.endswith(SPARE_SUFFIX)]
    assert spares and all(os.path.basename(f).startswith(".") for f in spares)
    assert len(spares) <= 6 + 4 * len(SHAPES)  # at most one per growing array
    open_run(tmp_path / "run").frames()  # reads fine beside them
    writer.finalize()
