"""What one new chunk file costs on this machine's disk: the floor under the store writer's time.

Every snapshot writes one new chunk file per per-snapshot array (4 per matrix
plus a few; 118 for the 28-matrix HF benchmark model). This measures, side by
side in one run and for each directory given, the time per file of the three
ways a file can be written, with payloads of a typical chunk's size, spread
over as many directories as the store has arrays:

* ``create``: a new file (``open(..., "wb")``, write, close), as the per-row
  chunks are written;
* ``create_rename``: a new temporary file renamed over the target, as
  ``RowChunks`` and zarr write them (atomic replacement);
* ``overwrite``: an existing file rewritten in place (no new inode), the
  baseline of writing the same bytes without creating anything.

The ratio ``create / overwrite`` is the price of creating inodes. Run it on the
disk the run stores go to and on a tmpfs (``/dev/shm``) for comparison.

``--churn N`` then deletes N files (as a benchmark deleting its run stores
between runs would) and measures again at once: on this project's VM the
creations right after a mass deletion are many times slower, for a minute or
two (which is why ``bench_hf_overhead.py`` keeps its stores until the end).

Usage: python bench/bench_fs_files.py [--dirs DIR ...] [--arrays 118] [--rounds 30] [--bytes 2000]
Writes bench/results/fs_files_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _filesystem(path: Path) -> str:
    """The mount's file-system type (from /proc/mounts; the longest matching mount point)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as handle:
            for line in handle:
                _, mount, fstype, *_ = line.split()
                if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def measure(root: Path, *, arrays: int, rounds: int, size: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench_fs_", dir=root))
    try:
        folders = [work / f"a{j:04d}" for j in range(arrays)]
        for folder in folders:
            folder.mkdir()
        payload = os.urandom(size)
        per_file: dict[str, list[float]] = {"create": [], "create_rename": [], "overwrite": []}
        for i in range(rounds):
            # Interleaved per round, so all three see the same moment of a shared disk.
            start = time.perf_counter()
            for folder in folders:
                with open(folder / f"c.{i}.0", "wb") as handle:
                    handle.write(payload)
            per_file["create"].append((time.perf_counter() - start) / arrays)
            start = time.perf_counter()
            for folder in folders:
                tmp = folder / f".r.{i}.0.tmp"
                with open(tmp, "wb") as handle:
                    handle.write(payload)
                os.replace(tmp, folder / f"r.{i}.0")
            per_file["create_rename"].append((time.perf_counter() - start) / arrays)
            start = time.perf_counter()
            for folder in folders:
                with open(folder / f"c.{i}.0", "r+b") as handle:
                    handle.write(payload)
            per_file["overwrite"].append((time.perf_counter() - start) / arrays)
        result = {f"{k}_us_median": statistics.median(v) * 1e6 for k, v in per_file.items()}
        result["create_over_overwrite"] = result["create_us_median"] / result["overwrite_us_median"]
        result["create_rename_over_overwrite"] = result["create_rename_us_median"] / result["overwrite_us_median"]
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _churn(root: Path, files: int) -> None:
    """Create ``files`` small files, then delete them all (a benchmark's clean-up between runs)."""
    work = Path(tempfile.mkdtemp(prefix="bench_fs_churn_", dir=root))
    for i in range(files):
        (work / f"{i // 1000}").mkdir(exist_ok=True)
        (work / f"{i // 1000}" / f"f{i}").write_bytes(b"x" * 2000)
    shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dirs", nargs="+", default=[".", "/dev/shm"], help="directories to measure (default: here and /dev/shm)")
    parser.add_argument("--arrays", type=int, default=118, help="directories written round-robin (the store's per-snapshot arrays)")
    parser.add_argument("--rounds", type=int, default=30, help="snapshots' worth of files")
    parser.add_argument("--bytes", type=int, default=2000, help="payload per file")
    parser.add_argument("--churn", type=int, default=0, help="then delete this many files and measure again")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fs_files_cpu.json")
    options = parser.parse_args()
    results = {}
    for folder in options.dirs:
        root = Path(folder)
        if not root.is_dir():
            print(f"skipping {folder}: not a directory")
            continue
        entry = measure(root, arrays=options.arrays, rounds=options.rounds, size=options.bytes)
        entry["filesystem"] = _filesystem(root)
        if options.churn:
            _churn(root, options.churn)
            entry["after_deleting"] = {"files": options.churn, **measure(root, arrays=options.arrays, rounds=options.rounds, size=options.bytes)}
        results[str(root.resolve())] = entry
        if "after_deleting" in entry:
            after = entry["after_deleting"]
            print(f"  right after deleting {after['files']} files: new file {after['create_us_median']:.0f} us, overwrite {after['overwrite_us_median']:.0f} us")
        print(
            f"{root.resolve()} ({entry['filesystem']}): new file {entry['create_us_median']:.0f} us, "
            f"new + rename {entry['create_rename_us_median']:.0f} us, overwrite {entry['overwrite_us_median']:.0f} us "
            f"(create / overwrite {entry['create_over_overwrite']:.1f}x)"
        )
    report = {
        "benchmark": "time per chunk file: new file, new file + rename, in-place overwrite (medians over rounds)",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "load_average": list(os.getloadavg()),
        "arrays": options.arrays,
        "rounds": options.rounds,
        "payload_bytes": options.bytes,
        "results": results,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {options.out}")


if __name__ == "__main__":
    main()
