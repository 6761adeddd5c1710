"""Readers are bounded by what is on disk: tiny crafted stores that declare huge contents give a
one-line StoreDamagedError within a stated memory bound, never an allocation of what they claim.

Each reader (open_run, `summary`, `inspect`, the TUI's loader) runs in a subprocess whose address
space is capped at 1 GiB (``resource.setrlimit(RLIMIT_AS)``); the intact store reads fine under
the same cap, so the cap is not what stops them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numcodecs import Zstd

from compass_monitor.store import schema
from test_store_damage import chunk, write_store

LIMIT = 1 << 30  # bytes of address space for each reader process

READERS = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from compass_monitor import cli
    from compass_monitor.store import StoreDamagedError, open_run
    from compass_monitor.tui.source import RunSource
    path = sys.argv[1]
    results = []
    for name, call in [("open_run", lambda: open_run(path)), ("tui", lambda: RunSource(path).load()),
                       ("summary", lambda: cli.main(["summary", path])), ("inspect", lambda: cli.main(["inspect", path]))]:
        try:
            code = call()
            results.append(f"{{name}}:" + ("ok" if code in (None, 0) or not isinstance(code, int) else f"exit {{code}}"))
        except StoreDamagedError as exc:
            results.append(f"{{name}}:damaged:" + str(exc).replace(chr(10), " "))
    peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("RESULTS", "|".join(results), "PEAK_KB", peak)
    """
)


def rle_zstd_frame(nbytes: int, *, declare: bool) -> bytes:
    """A zstd frame of ``nbytes`` zeros made of RLE blocks (4 bytes per 128 KiB), optionally without a content size."""
    block = 128 * 1024
    if declare:
        header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + nbytes.to_bytes(8, "little")  # single segment, 8-byte size
    else:
        header = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x58])  # no size; window descriptor 8 MiB
    blocks = []
    left = nbytes
    while left:
        size = min(block, left)
        left -= size
        value = (size << 3) | (1 << 1) | (1 if not left else 0)  # Block_Size, Block_Type=RLE, Last_Block
        blocks.append(value.to_bytes(3, "little") + b"\x00")
    return header + b"".join(blocks)


def chunk_shape(path: Path, array: str) -> list[int]:
    return json.loads((path / array / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]


def craft_commit_count(path: Path) -> str:
    commit = json.loads((path / schema.COMMIT_FILE).read_text())
    commit.update(snapshots=3_000_000, last_step=3_000_000)
    (path / schema.COMMIT_FILE).write_text(json.dumps(commit))
    return "says 3000000 snapshots"


def craft_huge_matrix(path: Path) -> str:
    meta = json.loads((path / "zarr.json").read_text())
    meta.pop("consolidated_metadata", None)
    meta["attributes"]["params"][0]["shape"] = [40000, 50000]
    (path / "zarr.json").write_text(json.dumps(meta))
    return "but the store's matrices make it"


def craft_huge_array(path: Path) -> str:
    # The payload array of matrix 0 declares 250 MB rows (the matrix record is left alone).
    name = f"{schema.CHANGED_PREFIX}/p0000"
    meta_path = path / name / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][1] = meta["chunk_grid"]["configuration"]["chunk_shape"][1] = 250_000_000
    meta_path.write_text(json.dumps(meta))
    root = json.loads((path / "zarr.json").read_text())  # and the finished store's consolidated copy, which zarr reads
    root["consolidated_metadata"]["metadata"][name] = meta
    (path / "zarr.json").write_text(json.dumps(root))
    return "but the store's matrices make it"


def craft_zip_bomb(path: Path, *, declare: bool = True, whole: bool = True) -> str:
    """A counts chunk (192 bytes declared by the array) replaced by a frame of 2 GiB of zeros
    (``whole``: all 16384 RLE blocks, 64 kB; else its header and first block only, 17 bytes)."""
    target = chunk(path, schema.COUNTS, 5)
    frame = rle_zstd_frame(2 << 30, declare=declare)
    target.write_bytes(frame if whole else frame[: (13 if declare else 6) + 4])
    if whole:  # the chunk holds ``rows`` snapshots of 4 matrices x 6 int64 counts (192 bytes each)
        rows = chunk_shape(path, schema.COUNTS)[0]
        return f"more than any chunk of {192 * rows} bytes compresses to"
    return "declares 2147483648 bytes" if declare else "declares None bytes"


def craft_frame_header(path: Path) -> str:
    # A valid, checksummed chunk of frame headers claiming 2**40 Rice positions for matrix 0.
    target = chunk(path, schema.FRAMES, 5)
    shape = chunk_shape(path, schema.FRAMES)
    headers = np.frombuffer(Zstd().decode(target.read_bytes()), dtype="<i8").reshape(shape).copy()
    headers[5 % shape[0], 0] = [2, 1 << 40, 3, 10]
    target.write_bytes(Zstd(level=1, checksum=True).encode(headers.tobytes()))
    return "damaged frame header"


CRAFTS = {
    "commit_count": craft_commit_count,
    "huge_matrix": craft_huge_matrix,
    "huge_array": craft_huge_array,
    "zip_bomb": craft_zip_bomb,
    "zip_bomb_header": lambda p: craft_zip_bomb(p, whole=False),
    "zip_bomb_no_size": lambda p: craft_zip_bomb(p, declare=False, whole=False),
    "frame_header": craft_frame_header,
}


def read_capped(path: Path) -> tuple[dict[str, str], int]:
    out = subprocess.run(
        [sys.executable, "-c", READERS.format(limit=LIMIT), str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULTS"))
    body, peak = line[len("RESULTS ") :].rsplit(" PEAK_KB ", 1)
    return {r.split(":", 1)[0]: r.split(":", 1)[1] for r in body.split("|")}, int(peak)


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bounded") / "run"
    write_store(path)
    return path


def test_intact_store_reads_under_the_cap(intact):
    results, peak = read_capped(intact)
    assert results == {"open_run": "ok", "tui": "ok", "summary": "ok", "inspect": "ok"}, results
    assert peak * 1024 < LIMIT


@pytest.mark.parametrize("craft", list(CRAFTS))
def test_crafted_store_is_refused_within_the_bound(tmp_path, intact, craft):
    path = tmp_path / "run"
    shutil.copytree(intact, path)
    needle = CRAFTS[craft](path)
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 1 << 20  # a tiny store
    results, peak = read_capped(path)
    assert peak * 1024 < LIMIT
    # open_run checks metadata, the commit and that chunk files exist; chunk contents are checked
    # when read: the TUI's loader and summary read the metrics, inspect decodes everything.
    # summary and inspect are CLI commands: one-line error, exit 2 (stderr checked in test_store_damage).
    at_open = craft in ("commit_count", "huge_matrix", "huge_array")
    in_metrics = at_open or craft.startswith("zip_bomb")
    for reader, expect_damage in (("open_run", at_open), ("tui", in_metrics)):
        if expect_damage:
            assert results[reader].startswith("damaged:") and needle in results[reader], (reader, needle, results)
        else:
            assert results[reader] == "ok", (reader, results)
    assert results["summary"] == ("exit 2" if in_metrics else "ok"), results
    assert results["inspect"] == "exit 2", results
