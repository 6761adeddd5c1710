"""The on-disk format, pinned: committed schema-1 and schema-2 stores read back, with ``open_run`` and
with plain zarr + numpy (the documented decoding), to the committed expected arrays.

A change of the format fails here; regenerate with ``tests/fixtures/make_reference_stores.py`` only
for a deliberate change, documented in docs/store-schema.md (older versions must stay readable).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from compass_monitor.store import open_run
from compass_monitor.store.integrity import verify_run

FIXTURES = Path(__file__).parent / "fixtures" / "reference_stores"


@pytest.fixture(params=["v1", "v2"])
def store(request, tmp_path):
    """(version, a copy of the committed store, its expected arrays)."""
    path = tmp_path / request.param
    shutil.copytree(FIXTURES / request.param, path)
    expected = dict(np.load(FIXTURES / f"expected_{request.param}.npz", allow_pickle=False))
    return request.param, path, expected


def plain_mask(group: zarr.Group, frames: np.ndarray | None, i: int, t: int, numel: int) -> np.ndarray:
    """docs/store-schema.md's numpy decoding of matrix i's packed mask at snapshot t."""
    payloads = group[f"masks/changed/p{i:04d}"]
    if frames is None:  # schema 1: every mask stored packed
        return np.asarray(payloads[t])
    headers = frames[: t + 1, i]
    start = max(j for j in range(t + 1) if headers[j, 0] & 1 == 0)
    packed = None
    for j in range(start, t + 1):
        encoding, ones, k, split = (int(x) for x in headers[j])
        payload = np.asarray(payloads[j])
        if encoding & 2:
            ends = np.flatnonzero(np.unpackbits(payload[:split]) == 0)[:ones]
            gaps = (np.diff(ends, prepend=-1) - 1) << k
            if k:
                low = np.unpackbits(payload[split:], count=ones * k).reshape(ones, k)
                gaps |= low.astype(np.int64) @ (1 << np.arange(k - 1, -1, -1))
            bits = np.zeros(numel, dtype=bool)
            bits[np.cumsum(gaps + 1) - 1] = True
            frame = np.packbits(~bits if encoding & 4 else bits)
        else:
            frame = payload[: (numel + 7) // 8]
        packed = frame if encoding & 1 == 0 else packed ^ frame
    return packed


def test_reference_store_with_open_run(store):
    version, path, expected = store
    run = open_run(path)
    assert run.schema_version == int(version[1])
    assert run.status == "finished" and run.num_snapshots == expected["steps"].size
    np.testing.assert_array_equal(run.steps, expected["steps"])
    np.testing.assert_array_equal(run.times, expected["times"])
    np.testing.assert_array_equal(run.counts, expected["counts"])
    np.testing.assert_array_equal(run.null_overlap, expected["null"])
    np.testing.assert_array_equal(run.base_fingerprint, expected["fingerprint"])
    np.testing.assert_array_equal(run.base_class_counts, expected["class_counts"])
    for p in run.params:
        i = p.index
        np.testing.assert_array_equal(run.row_counts(p), expected[f"rows/{i}"])
        np.testing.assert_array_equal(run.col_counts(p), expected[f"cols/{i}"])
        for r, which in enumerate(("principal", "low", "principal_not_low")):
            np.testing.assert_array_equal(run.reference_mask(p, which).ravel(), np.unpackbits(expected[f"reference/{i}"][r], count=p.numel).astype(bool))
        for t in range(run.num_snapshots):
            np.testing.assert_array_equal(run.packed_mask(p, t), expected[f"masks/{i}"][t], err_msg=f"{version} {p.name} t={t}")
        if version == "v2":
            np.testing.assert_array_equal(run.base_codes(p), expected[f"base/{i}"])
            np.testing.assert_array_equal(np.stack([run.preview_counts(p, t) for t in range(run.num_snapshots)]), expected[f"previews/{i}"])
        else:
            assert run.base_codes(p) is None
    if version == "v2":
        np.testing.assert_array_equal(run.frames(), expected["frames"])
        np.testing.assert_array_equal(run.spectral_metrics, expected["spectral"])
    else:
        assert run.spectral_metrics is None and not run.frames().any()  # read as packed key frames
    assert verify_run(run) == []


def test_reference_store_with_plain_zarr(store):
    version, path, expected = store
    group = zarr.open_group(store=str(path), mode="r")
    assert group.attrs["format"] == "compass-monitor-run" and group.attrs["schema_version"] == int(version[1])
    t = json.loads((path / "commit.json").read_text())["snapshots"]
    for name, key in (("snapshots/step", "steps"), ("snapshots/time", "times"), ("metrics/counts", "counts"),
                      ("metrics/null_overlap", "null"), ("base/fingerprint", "fingerprint"), ("base/class_counts", "class_counts")):
        np.testing.assert_array_equal(np.asarray(group[name][:t] if name.startswith(("snapshots", "metrics")) else group[name][...]), expected[key], err_msg=name)
    frames = np.asarray(group["masks/frames"][:t]) if version == "v2" else None
    for i, record in enumerate(group.attrs["params"]):
        m, n = record["shape"]
        np.testing.assert_array_equal(np.asarray(group[f"profiles/rows/p{i:04d}"][:t]), expected[f"rows/{i}"])
        np.testing.assert_array_equal(np.asarray(group[f"profiles/cols/p{i:04d}"][:t]), expected[f"cols/{i}"])
        np.testing.assert_array_equal(np.asarray(group[f"masks/reference/p{i:04d}"][...]), expected[f"reference/{i}"])
        for s in range(t):
            np.testing.assert_array_equal(plain_mask(group, frames, i, s, m * n), expected[f"masks/{i}"][s], err_msg=f"{version} p{i} t={s}")
        if version == "v2":
            np.testing.assert_array_equal(np.asarray(group[f"base/weights/p{i:04d}"][...]), expected[f"base/{i}"])
            np.testing.assert_array_equal(np.asarray(group[f"previews/p{i:04d}"][:t]), expected[f"previews/{i}"])
    if version == "v2":
        np.testing.assert_array_equal(frames, expected["frames"])
        np.testing.assert_array_equal(np.asarray(group["metrics/spectral"][:t]), expected["spectral"])


def test_the_schema_1_fixture_has_the_old_writers_layout():
    """What makes it schema 1: '/' chunk keys, no frame index, previews, spectral or base weights,
    a four-field commit, and no chunk files for all-zero rows (zarr skipped them)."""
    root = FIXTURES / "v1"
    assert json.loads((root / "commit.json").read_text()).keys() == {"snapshots", "last_step", "status", "heartbeat"}
    for absent in ("masks/frames", "previews", "metrics/spectral", "base/weights"):
        assert not (root / absent).exists()
    assert (root / "metrics" / "counts" / "c" / "0" / "0" / "0").is_file()
    assert not (root / "masks" / "changed" / "p0000" / "c" / "2" / "0").exists()  # the empty mask at t=2
    assert (root / "masks" / "changed" / "p0000" / "c" / "1" / "0").is_file()
