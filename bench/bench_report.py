"""Cost of ``compass-monitor report`` and ``compare`` on a large run: wall time and peak memory.

The run is the TUI benchmark's synthetic run (``tests/synthetic_runs.write_bulk_run``:
200 matrices x 1000 snapshots, metrics for every snapshot, masks for the first
two matrices), and a second one of the same base (seed 1) for the cross-run
commands. Each command runs in a fresh Python process that reports its own
wall time and peak RSS (``ru_maxrss``), so imports are included and runs do not
share caches; ``import only`` is the floor (Python, numpy, zarr, matplotlib).

What bounds the cost: the time series read the stored counts (T x P x F int64,
9.6 MB here); profiles read one stored row per matrix; masks are decoded only
for the chosen matrices (and, across runs, the final mask of each shared matrix
once per run, one matrix at a time).

Usage: python bench/bench_report.py [--snapshots 1000] [--matrices 200]
Writes bench/results/report_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore", module=r"zarr(\\..*)?$")
start = time.perf_counter()
args = json.loads(sys.argv[1])
if args:
    import contextlib, io
    from compass_monitor.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
else:
    import compass_monitor.cli, compass_monitor.report.build  # imports only
    rc = 0
print(json.dumps({"rc": rc, "wall_s": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import matplotlib
    import numpy
    import psutil
    import zarr

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "matplotlib": matplotlib.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=1000)
    parser.add_argument("--matrices", type=int, default=200)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    try:
        # The runs are built in another process: Linux keeps a process's peak RSS across fork and exec,
        # so the children that are measured must be forked from this small parent.
        t = time.perf_counter()
        big, other = tmp / "large", tmp / "large-b"
        build = ("import sys, warnings; warnings.filterwarnings('ignore');"
                 "sys.path.insert(0, 'tests'); from synthetic_runs import write_bulk_run;"
                 f"[write_bulk_run(p, matrices={args.matrices}, snapshots={args.snapshots}, seed=s) for s, p in enumerate(sys.argv[1:])]")
        subprocess.run([sys.executable, "-c", build, str(big), str(other)], cwd=ROOT, check=True)
        build_s = time.perf_counter() - t
        store_mb = sum(f.stat().st_size for f in big.rglob("*") if f.is_file()) / 2**20
        cases = {
            "import_only": [],
            "report_one_run": ["report", str(big), "--out", str(tmp / "out1")],
            "compare_two_runs": ["compare", str(big), str(other)],
            "report_two_runs": ["report", str(big), str(other), "--out", str(tmp / "out2")],
        }
        results = {name: measure(command) for name, command in cases.items()}
        parent_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        figures = sorted(p.name for p in (tmp / "out2").glob("*.png"))
        result = {
            "benchmark": "compass-monitor report / compare on a large run: wall time and peak RSS per command (fresh process each)",
            "machine": machine(),
            "parent_peak_rss_mb_before_measuring": round(parent_rss_mb, 1),
            "large_run": {"matrices": args.matrices, "snapshots": args.snapshots, "store_mb": round(store_mb, 1), "build_s": round(build_s, 2)},
            "results": results,
            "figures_two_runs": figures,
            "note": "2-core machine shared with other jobs (see load average); single runs, expect +-30% noise on wall time",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "bench" / "results" / "report_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
