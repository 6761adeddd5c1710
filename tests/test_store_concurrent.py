"""A reader in one process polls while a writer in another appends: no torn or inconsistent read."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from compass_monitor.store import open_run
from compass_monitor.store.schema import NotARunError
from store_stream import block_counts, masks

SNAPSHOTS = 120
SEED = 77
MIN_POLLS = 200

WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from store_stream import masks, record, specs, write_base
    from compass_monitor.store import AsyncWriter, RunWriter
    stream = masks({seed}, {n})
    w = RunWriter.create({path!r}, params=specs(), attributes={{}}, key_interval=5)
    writer = AsyncWriter(w, queue_size=2, heartbeat_interval=0.03)  # heartbeats rewrite the commit in between
    writer.submit_base(fingerprints=__import__("numpy").zeros((4, 2), dtype="int64"),
                       class_counts=__import__("numpy").zeros((4, 4, 512), dtype="int64"),
                       reference_packed=[__import__("numpy").zeros((3, (m * n + 7) // 8), dtype="uint8") for m, n in [s.shape for s in specs()]])
    for t in range(len(stream)):
        assert writer.submit(record(t + 1, stream[t], stream[t - 1] if t else None))
        time.sleep(0.05 if t % 10 else 0.15)  # paced, so that a slow (loaded) reader still sees many states
    writer.close()
    """
)


def check(run, stream, rng) -> int:
    """Check everything a viewer reads at the newest committed snapshot, and one older one."""
    t_count = run.num_snapshots
    if t_count == 0:
        return 0
    steps = run.steps
    assert steps.tolist() == list(range(1, t_count + 1))
    counts = run.counts
    assert counts.shape[0] == t_count
    for t in {t_count - 1, int(rng.integers(t_count))}:
        for p in run.params:
            expected = stream[t][p.index]
            np.testing.assert_array_equal(run.mask(p, t), expected, err_msg=f"snapshot {t} {p.name}")
            assert counts[t, p.index, 0] == expected.sum()
            rows, cols = run.preview_edges(p)
            np.testing.assert_array_equal(run.preview_counts(p, t), block_counts(expected, rows, cols))
    for p in run.params:
        np.testing.assert_array_equal(run.row_counts(p)[-1], stream[t_count - 1][p.index].sum(axis=1))
        assert run.col_counts(p).shape[0] == t_count
    assert run.commit["heartbeat"] is not None
    return t_count


def test_reader_polls_while_writer_appends(tmp_path, rng):
    path = tmp_path / "run"
    stream = masks(SEED, SNAPSHOTS)
    code = WRITER.format(tests=str(Path(__file__).parent), seed=SEED, n=SNAPSHOTS, path=str(path))
    writer = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        run = None
        while run is None:
            assert time.monotonic() < deadline and writer.poll() in (None, 0)
            try:
                run = open_run(path)
            except NotARunError:  # not created yet (or its metadata is being created)
                time.sleep(0.01)
        polls, seen, fresh = 0, [], 0
        while writer.poll() is None or polls < MIN_POLLS:
            assert time.monotonic() < deadline
            changed = run.refresh()
            fresh += changed
            count = check(run, stream, rng)
            if seen:
                assert count >= seen[-1]  # committed snapshots never disappear
            seen.append(count)
            polls += 1
            time.sleep(0.002)
        assert writer.wait(timeout=60) == 0, writer.stderr.read()[-3000:]
    finally:
        if writer.poll() is None:
            writer.kill()
    run.refresh()
    assert run.status == "finished" and check(run, stream, rng) == SNAPSHOTS
    assert polls >= MIN_POLLS and fresh >= 20 and len(set(seen)) >= 20, (polls, fresh, len(set(seen)))


def test_every_metadata_write_describes_a_complete_group(tmp_path, monkeypatch):
    """A reader can open zarr.json at any moment of creation: each version written must be complete.

    (zarr's ``attrs.update`` rewrites zarr.json once per key; a reader polling a
    run being created once saw ``format`` without ``schema_version``.)
    """
    import json

    import zarr.storage

    from compass_monitor.store import RunWriter, schema
    from store_stream import specs

    writes: list[tuple[str, dict]] = []
    original = zarr.storage.LocalStore.set

    async def recording_set(self, key, value):
        if key.endswith("zarr.json"):
            writes.append((key, json.loads(value.to_bytes())))
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", recording_set)
    RunWriter.create(tmp_path / "run", params=specs(), attributes={"run": {"name": "x"}}, key_interval=3).finalize()
    root = [meta["attributes"] for key, meta in writes if key == "zarr.json"]
    assert root, "no root metadata write was seen: the recorder no longer intercepts zarr's writes"
    for attributes in root:
        assert attributes.get("format") == schema.FORMAT_NAME and attributes.get("schema_version") == schema.SCHEMA_VERSION
        assert attributes.get("params") and attributes.get("run") == {"name": "x"}
    previews = [meta for key, meta in writes if key.startswith(schema.PREVIEW_PREFIX + "/")]
    assert len(previews) >= len(specs())
    assert all("row_edges" in meta["attributes"] and "col_edges" in meta["attributes"] for meta in previews)
