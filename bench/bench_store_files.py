"""Files, disk use and read time of a long run: one file per snapshot and array vs time-chunked arrays.

A run store writes one chunk per per-snapshot array; with one snapshot per
chunk that is 5 + 4P files per snapshot (P matrices), which for a long run of
small matrices means ~100,000 files and hundreds of MB of file-system blocks
for a few MB of data, and readers that open a file per snapshot. Since
``storage.time_chunk_bytes``, snapshots share a chunk file up to 64 KiB of
uncompressed row data (``store.writer.time_chunk_rows``). This writes, side by
side in one run, the same seeded synthetic stream (``tests/synthetic_runs``,
2 blocks x 7 matrices of a 64-wide Llama-shaped model, 14 matrices) at 100 and
2,000 snapshots in both layouts, on the disk of ``--dir``, and reports:

* files and disk blocks (``st_blocks``) of the finished store vs the bytes of its files;
* the writer's time per snapshot (``RunWriter.append``, encoding + files + commit);
* ``compass-monitor summary`` wall time (fresh process, median of ``--repeats``);
* a viewer's reads: the last snapshot's mask, row and column profile and preview of every matrix.

Usage: python bench/bench_store_files.py [--dir DIR] [--repeats 3]
Writes bench/results/store_files_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from synthetic_runs import SyntheticWriter  # noqa: E402

LAYOUTS = {"one_snapshot_per_chunk": 0, "time_chunked": None}  # None: the writer's default budget


def disk_use(path: Path) -> dict:
    files = blocks = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(folder, name))
            files += 1
            blocks += st.st_blocks * 512
            size += st.st_size
    return {"files": files, "disk_mb": round(blocks / 1e6, 2), "file_bytes_mb": round(size / 1e6, 3)}


def write(path: Path, snapshots: int, budget: int | None) -> float:
    options = {} if budget is None else {"time_chunk_bytes": budget}
    writer = SyntheticWriter(path, seed=0, writer_options=options)
    spent = 0.0
    for _ in range(snapshots):
        start = time.perf_counter()
        writer.append()
        spent += time.perf_counter() - start
    writer.finish()
    return spent / snapshots


def summary_time(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compass_monitor.cli", "summary", str(path)], check=True, capture_output=True)
    return time.perf_counter() - start


def viewer_reads(path: Path) -> float:
    from compass_monitor import open_run

    start = time.perf_counter()
    run = open_run(path)
    t = run.num_snapshots - 1
    for p in run.params:
        run.mask(p, t)
        run.preview_counts(p, t)
    run.counts  # noqa: B018
    return time.perf_counter() - start


def machine() -> dict:
    import numpy
    import zarr

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average_1m_at_start": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "numpy": numpy.__version__, "zarr": zarr.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder on /tmp's disk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--snapshots", type=int, nargs="+", default=[100, 2000])
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="store-files-", dir=args.dir))
    results = {"machine": machine(), "store_dir": str(base), "matrices": 14, "runs": []}
    try:
        for snapshots in args.snapshots:
            for layout, budget in LAYOUTS.items():
                path = base / f"{layout}-{snapshots}"
                per_snapshot = write(path, snapshots, budget)
                entry = {"layout": layout, "snapshots": snapshots, **disk_use(path),
                         "write_ms_per_snapshot": round(1e3 * per_snapshot, 2)}
                entry["files_per_snapshot"] = round(entry["files"] / snapshots, 2)
                entry["summary_s"] = round(statistics.median(summary_time(path) for _ in range(args.repeats)), 3)
                entry["viewer_reads_s"] = round(statistics.median(viewer_reads(path) for _ in range(args.repeats)), 3)
                results["runs"].append(entry)
                print(json.dumps(entry), flush=True)
        by = {(r["layout"], r["snapshots"]): r for r in results["runs"]}
        results["ratios_time_chunked_vs_one_per_chunk"] = {
            str(n): {key: round(by["time_chunked", n][key] / by["one_snapshot_per_chunk", n][key], 3)
                     for key in ("files", "disk_mb", "write_ms_per_snapshot", "summary_s", "viewer_reads_s")}
            for n in args.snapshots
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = ROOT / "bench" / "results" / "store_files_cpu.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios_time_chunked_vs_one_per_chunk"], indent=2))


if __name__ == "__main__":
    main()
