"""RowChunks writes the same chunk files zarr's own setitem writes, and falls back where it cannot."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from compass_monitor.store.row_chunks import RowChunks


def _chunk_files(root, name):
    folder = root / name / "c"
    # (not the spares RowChunks keeps beside shared chunks: hidden files no reader opens)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.mark.parametrize(
    ("dtype", "row_shape", "fill"),
    [("uint8", (37,), 0), ("int32", (5,), 0), ("int64", (3, 4), -1), ("float64", (2, 6), float("nan")), ("int32", (1, 1, 7), 0)],
)
def test_direct_rows_equal_zarr_setitem_bytes(tmp_path, rng, dtype, row_shape, fill):
    group = zarr.open_group(str(tmp_path), mode="w-", zarr_format=3)
    shape, chunks = (6, *row_shape), (1, *row_shape)
    ours = group.create_array("ours", shape=shape, chunks=chunks, dtype=dtype, compressors=ZstdCodec(level=1), fill_value=fill)
    theirs = group.create_array("theirs", shape=shape, chunks=chunks, dtype=dtype, compressors=ZstdCodec(level=1), fill_value=fill)
    rows = RowChunks(ours)
    assert rows.direct
    values = (rng.standard_normal(shape) * 1000).astype(dtype)
    if np.issubdtype(np.dtype(dtype), np.floating):
        values.flat[::5] = np.nan
        values.flat[1::7] = -0.0
        values.flat[2::11] = np.inf
    for t in rng.permutation(shape[0]):
        rows.write(int(t), values[t][None])
        theirs[t : t + 1] = values[t][None]
    assert _chunk_files(tmp_path, "ours") == _chunk_files(tmp_path, "theirs")  # byte for byte
    reopened = zarr.open_array(str(tmp_path / "ours"), mode="r")
    np.testing.assert_array_equal(reopened[:], values)  # NaN positions equal too
    with pytest.raises(IndexError, match="outside"):
        rows.write(shape[0], values[0])


def test_after_resize_rows_land_in_the_grown_array(tmp_path, rng):
    group = zarr.open_group(str(tmp_path), mode="w-", zarr_format=3)
    array = group.create_array("a", shape=(2, 9), chunks=(1, 9), dtype="int32", compressors=ZstdCodec(level=1))
    rows = RowChunks(array)
    array.resize((5, 9))
    values = rng.integers(-50, 50, (5, 9)).astype("int32")
    for t in range(5):
        rows.write(t, values[t])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[:], values)


@pytest.mark.parametrize("rows_per_chunk", [3, 4])
def test_multi_row_chunks_equal_zarr_and_survive_truncation(tmp_path, rng, rows_per_chunk):
    """Chunks of several rows (the step and time columns): filled in memory, same bytes as zarr's read-modify-write."""
    group = zarr.open_group(str(tmp_path), mode="w-", zarr_format=3)
    kwargs = dict(shape=(10,), chunks=(rows_per_chunk,), dtype="int64", compressors=ZstdCodec(level=1), fill_value=-1)
    ours, theirs = group.create_array("ours", **kwargs), group.create_array("theirs", **kwargs)
    rows = RowChunks(ours)
    assert rows.direct
    values = rng.integers(0, 1 << 40, 10)
    for t in range(7):
        rows.write(t, values[t])
        theirs[t : t + 1] = values[t : t + 1]
    assert _chunk_files(tmp_path, "ours") == _chunk_files(tmp_path, "theirs")
    # A resumed run drops rows 5 and 6 and writes others there: after reset, the chunk is read back.
    ours.resize((5,))
    ours.resize((10,))
    rows.reset()
    for t in (5, 6):
        rows.write(t, values[t] + 1)
    stored = zarr.open_array(str(tmp_path / "ours"), mode="r")[:7]
    np.testing.assert_array_equal(stored, np.concatenate([values[:5], values[5:7] + 1]))
    # A writer that starts in the middle of a chunk (a reopened store) keeps the rows already there.
    again = RowChunks(ours)
    again.write(7, 99)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours"), mode="r")[:8], np.concatenate([stored, [99]]))


def test_other_codecs_fall_back_to_zarr(tmp_path, rng):
    group = zarr.open_group(str(tmp_path), mode="w-", zarr_format=3)
    array = group.create_array("a", shape=(8, 4), chunks=(1, 4), dtype="int64", compressors=BloscCodec())
    rows = RowChunks(array)
    assert not rows.direct
    values = rng.integers(0, 9, (8, 4))
    for t in range(8):
        rows.write(t, values[t])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[:], values)
