"""Mask frames, previews and the schema-2 layout: exact round trips, portable arrays, bounded decoding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from compass_monitor.store import RunWriter, codec, open_run, schema
from store_stream import SHAPES, block_counts, masks, record, specs, write_base


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000, 12345])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.03, 0.3, 0.5, 0.7, 0.999, 1.0])
@pytest.mark.parametrize("delta", [False, True])
def test_frame_round_trip(rng, numel, density, delta):
    bits = rng.random(numel) < density
    packed = np.packbits(bits)
    frame = codec.encode_frame(packed, numel, delta=delta)
    assert frame.payload.size <= packed.size  # never larger than packed bits
    assert bool(frame.encoding & codec.DELTA) == delta
    np.testing.assert_array_equal(codec.decode_frame(frame.header(), frame.payload, numel), packed)
    previous = np.packbits(rng.random(numel) < 0.5)
    after = codec.apply_frame(previous, frame.header(), frame.payload, numel)
    np.testing.assert_array_equal(after, (previous ^ packed) if delta else packed)


def test_rice_positions_exact_and_near_entropy(rng):
    numel = 2_000_000
    for p in (0.001, 0.01, 0.02):
        bits = rng.random(numel) < p
        positions = np.flatnonzero(bits)
        np.testing.assert_array_equal(codec.set_positions(np.packbits(bits), numel), positions)
        payload, k, split = codec.rice_encode(positions)
        np.testing.assert_array_equal(codec.rice_decode(payload, positions.size, k, split), positions)
        bound_bytes = numel * codec.binary_entropy(positions.size / numel) / 8
        assert payload.size / bound_bytes < 1.02, (p, payload.size / bound_bytes)


@pytest.mark.parametrize("shape", [(37, 29), (64, 48), (1, 130), (300, 256), (5, 3), (33, 40)])
def test_preview_counts_match_slicing(rng, shape):
    mask = rng.random(shape) < 0.3
    rows, cols = codec.preview_edges(*shape, schema.PREVIEW_MAX_BLOCKS)
    assert rows[0] == cols[0] == 0 and rows[-1] == shape[0] and cols[-1] == shape[1]
    assert rows.size - 1 == min(32, shape[0]) and cols.size - 1 == min(32, shape[1])
    assert np.all(np.diff(rows) > 0) and np.all(np.diff(cols) > 0)
    got = codec.preview_counts(np.packbits(mask.ravel()), shape, rows, cols)
    np.testing.assert_array_equal(got, block_counts(mask, rows, cols))


def write_stream(path, *, snapshots=11, key_interval=3, seed=5, finalize=True):
    writer = RunWriter.create(path, params=specs(), attributes={}, key_interval=key_interval)
    write_base(writer)
    stream = masks(seed, snapshots)
    for t, current in enumerate(stream):
        writer.append(record(10 * (t + 1), current, stream[t - 1] if t else None))
    if finalize:
        writer.finalize()
    return stream


def test_store_round_trip_any_order(tmp_path, rng):
    stream = write_stream(tmp_path / "run")
    run = open_run(tmp_path / "run")
    assert run.status == "finished" and run.num_snapshots == 11 and run.key_interval == 3
    frames = run.frames()
    assert frames.shape == (11, len(SHAPES), 4)
    assert [t for t in range(11) if not frames[t, 0, 0] & codec.DELTA] == [0, 3, 6, 9]
    order = list(range(11)) + list(range(10, -1, -1)) + rng.permutation(11).tolist()
    for t in order:  # forwards, backwards (through the reader's cache) and random access
        for p, (m, n) in enumerate(SHAPES):
            np.testing.assert_array_equal(run.mask(p, t), stream[t][p], err_msg=f"snapshot {t} matrix {p}")
    for p in range(len(SHAPES)):
        rows, cols = run.preview_edges(p)
        for t in range(11):
            np.testing.assert_array_equal(run.preview_counts(p, t), block_counts(stream[t][p], rows, cols))
            area = np.diff(rows)[:, None] * np.diff(cols)[None, :]
            np.testing.assert_allclose(run.preview(p, t), block_counts(stream[t][p], rows, cols) / area)
        np.testing.assert_array_equal(run.row_counts(p), np.stack([s[p].sum(axis=1) for s in stream]))
        np.testing.assert_array_equal(run.col_counts(p), np.stack([s[p].sum(axis=0) for s in stream]))
    assert run.steps.tolist() == [10 * (t + 1) for t in range(11)]


def test_arrays_use_only_spec_codecs_and_plain_zarr_decodes(tmp_path):
    """Every array: bytes + zstd. A plain zarr + numpy reader decodes a mask with the documented recipe."""
    stream = write_stream(tmp_path / "run", snapshots=8, key_interval=4)
    root = tmp_path / "run"
    for meta in root.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array":
            names = [c["name"] for c in doc["codecs"]]
            assert names == ["bytes", "zstd"], (meta, names)
    # The recipe of docs/store-schema.md, with nothing from compass_monitor but json/numpy/zarr:
    g = zarr.open_group(str(root), mode="r")
    T = json.load(open(root / "commit.json"))["snapshots"]
    p = g.attrs["params"][1]
    m, n = p["shape"]
    t = T - 1
    frames = g["masks/frames"][: t + 1, 1]
    start = max(j for j in range(t + 1) if frames[j, 0] & 1 == 0)
    packed = None
    for j in range(start, t + 1):
        encoding, ones, k, split = (int(x) for x in frames[j])
        payload = g[f"masks/changed/{p['id']}"][j]
        if encoding & 2:  # Rice-coded positions
            unary = np.unpackbits(payload[:split])
            ends = np.flatnonzero(unary == 0)[:ones]
            gaps = (np.diff(ends, prepend=-1) - 1) << k
            if k:
                low = np.unpackbits(payload[split:], count=ones * k).reshape(ones, k)
                gaps |= low.astype(np.int64) @ (1 << np.arange(k - 1, -1, -1))
            bits = np.zeros(m * n, dtype=bool)
            bits[np.cumsum(gaps + 1) - 1] = True
            if encoding & 4:
                bits = ~bits
            frame = np.packbits(bits)
        else:
            frame = payload
        packed = frame if (encoding & 1) == 0 else packed ^ frame
    mask = np.unpackbits(packed, count=m * n).reshape(m, n).astype(bool)
    np.testing.assert_array_equal(mask, stream[t][1])


def test_running_store_reads_committed_rows_only(tmp_path):
    path = tmp_path / "run"
    writer = RunWriter.create(path, params=specs(), attributes={}, key_interval=4)
    write_base(writer)
    stream = masks(9, 5)
    run = open_run(path)
    assert run.num_snapshots == 0 and run.status == "running" and run.refresh() is False
    for t in range(3):
        writer.append(record(t + 1, stream[t], stream[t - 1] if t else None))
    assert run.num_snapshots == 0  # nothing new until refresh
    assert run.refresh() is True and run.num_snapshots == 3 and run.refresh() is False
    assert run.steps.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(run.mask(0, 2), stream[2][0])
    for t in range(3, 5):
        writer.append(record(t + 1, stream[t], stream[t - 1]))
    assert run.refresh() and run.steps.tolist() == [1, 2, 3, 4, 5] and run.counts.shape[0] == 5
    np.testing.assert_array_equal(run.mask(0, 4), stream[4][0])
    assert run.commit["heartbeat"] > 0 and run.heartbeat_age < 60 and not run.is_stale
    writer.finalize()
    assert run.refresh() is False and run.status == "finished"
    np.testing.assert_array_equal(run.mask(3, 4), stream[4][3])


def test_schema_1_store_still_reads(tmp_path):
    """A version-1 layout (every mask packed, no frames, no previews) reads through the same API."""
    stream = write_stream(tmp_path / "run", snapshots=4)
    root = tmp_path / "run"
    g = zarr.open_group(str(root), mode="r+", use_consolidated=False)
    for i, (m, n) in enumerate(SHAPES):
        g[f"masks/changed/p{i:04d}"][...] = np.stack([np.packbits(s[i].ravel()) for s in stream])
    shutil.rmtree(root / "masks" / "frames")
    shutil.rmtree(root / "previews")
    meta = json.loads((root / "zarr.json").read_text())
    meta.pop("consolidated_metadata", None)
    meta["attributes"]["schema_version"] = 1
    (root / "zarr.json").write_text(json.dumps(meta))
    run = open_run(root)
    assert run.schema_version == 1
    for t in range(4):
        np.testing.assert_array_equal(run.mask(2, t), stream[t][2])
        rows, cols = run.preview_edges(0)
        np.testing.assert_array_equal(run.preview_counts(0, t), block_counts(stream[t][0], rows, cols))
