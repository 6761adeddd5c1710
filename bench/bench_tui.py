"""TUI cost on a large run: time to first paint, memory, and the delay from a commit to its display.

* ``large run``: 200 matrices x 1000 snapshots (synthetic, metrics written in bulk;
  masks for the first two matrices), the size of a multi-day run with a 7B-class
  model's attention and MLP matrices of a few layers, or all of a small model.
* ``headless``: in this process, from ``CompassApp(...)`` to (a) the run screen's
  first paint, (b) the heatmap showing the latest snapshots (read first) and
  (c) every snapshot and the precision nulls loaded (Textual's headless driver,
  120 x 40).
* ``terminal``: ``python -m compass_monitor.cli tui RUN`` started in tmux (a real
  terminal, 120 x 40): from process start to the heatmap's numbers on screen,
  polling ``tmux capture-pane`` every 20 ms; then the app process's RSS. Skipped
  without tmux. Includes Python start-up and every import of the command.
* ``commit to display``: a separate process appends snapshots to a live run of
  203 matrices (one every second) and records the time each commit file was
  replaced; the app (headless, following) records when each snapshot appears.

Goals (issue 6): first paint < 1 s, RSS < 300 MB, new snapshots on screen within a second.

Usage: python bench/bench_tui.py [--snapshots 1000] [--matrices 200] [--commits 10]
Writes bench/results/tui_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
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

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/synthetic_runs.py

WRITER = """
import sys, time
sys.path.insert(0, "tests")  # the synthetic runs are test scaffolding (tests/synthetic_runs.py)
from synthetic_runs import SyntheticSpec, SyntheticWriter
w = SyntheticWriter(sys.argv[1], spec=SyntheticSpec(layers=29), seed=0)
w.append()
print("start", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    time.sleep(1.0)
    w.append(wall_time=time.time())
    print(f"commit {w.t} {time.time():.6f}", flush=True)
w.finish()
print("done", flush=True)
"""


def machine() -> dict:
    import numpy
    import textual
    import zarr

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "textual": textual.__version__,
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
    }


async def headless(run: Path) -> dict:
    from compass_monitor.tui.app import CompassApp
    from compass_monitor.tui.screens.run import RunScreen

    start = time.perf_counter()
    app = CompassApp(run)
    marks: dict[str, float] = {}
    async with app.run_test(size=(120, 40)) as pilot:
        while True:
            screen = app.screen
            if isinstance(screen, RunScreen):
                if "frame" not in marks and screen.is_mounted:
                    marks["frame"] = time.perf_counter() - start
                if "data" not in marks and screen.view is not None and screen.heatmap.num_cols:
                    await pilot.pause()
                    marks["data"] = time.perf_counter() - start
                if screen.view is not None and not screen.view.partial and screen.view.null is not None:
                    await pilot.pause()
                    marks["all"] = time.perf_counter() - start
                    break
            await asyncio.sleep(0.002)
        rss = psutil.Process().memory_info().rss
    return {"first_paint_s": marks["frame"], "heatmap_with_latest_data_s": marks["data"], "all_snapshots_loaded_s": marks["all"]}


def terminal(run: Path) -> dict | None:
    if shutil.which("tmux") is None:
        return None
    session = f"bench-tui-{os.getpid()}"
    command = f"exec {sys.executable} -m compass_monitor.cli tui {run}"
    env_prefix = f"cd {ROOT} && PYTHONPATH={ROOT} "
    start = time.perf_counter()
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", env_prefix + command], check=True)
    try:
        frame = shown = None
        while time.perf_counter() - start < 30:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            if frame is None and "quit" in screen:  # the footer: the app's first frame
                frame = time.perf_counter() - start
            if "global sparsity" in screen:
                shown = time.perf_counter() - start
                break
            time.sleep(0.02)
        pid = int(subprocess.run(["tmux", "list-panes", "-t", session, "-F", "#{pane_pid}"], capture_output=True, text=True).stdout.split()[0])
        time.sleep(1.0)
        proc = psutil.Process(pid)
        rss = proc.memory_info().rss
        quit_start = time.perf_counter()
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        proc.wait(timeout=20)
        quit_s = time.perf_counter() - quit_start
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    import_s = float(subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); import compass_monitor.cli; print(time.perf_counter() - t)"],
                                    capture_output=True, text=True, cwd=ROOT).stdout)
    return {"process_start_to_first_frame_s": frame, "process_start_to_data_on_screen_s": shown, "of_which_import_compass_monitor_s": import_s, "rss_mb": rss / 2**20, "quit_s": quit_s}


async def latency(run: Path, commits: int) -> dict:
    from compass_monitor.tui.app import CompassApp

    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(commits)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "start"
    seen: dict[int, float] = {}
    app = CompassApp(run)
    async with app.run_test(size=(120, 40)) as pilot:
        while getattr(app.screen, "view", None) is None:
            await asyncio.sleep(0.01)
        screen = app.screen
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.time() + commits * 1.5 + 30
        while len(seen) < commits and time.time() < deadline:
            n = screen.view.num_snapshots
            if n not in seen and n > 1:
                seen[n] = time.time()
            await asyncio.sleep(0.002)
    out = proc.communicate(timeout=60)[0]
    committed = {int(line.split()[1]): float(line.split()[2]) for line in out.splitlines() if line.startswith("commit")}
    delays = [seen[n] - committed[n] for n in sorted(seen) if n in committed]
    return {
        "matrices": 203,
        "commits": len(delays),
        "poll_interval_s": 0.25,
        "delay_s": {"median": statistics.median(delays), "max": max(delays), "min": min(delays)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=1000)
    parser.add_argument("--matrices", type=int, default=200)
    parser.add_argument("--commits", type=int, default=10)
    args = parser.parse_args()

    import warnings

    warnings.filterwarnings("ignore", module=r"zarr(\..*)?$")
    from synthetic_runs import write_bulk_run

    tmp = Path(tempfile.mkdtemp(prefix="bench-tui-"))
    try:
        t = time.perf_counter()
        big = write_bulk_run(tmp / "large", matrices=args.matrices, snapshots=args.snapshots)
        build_s = time.perf_counter() - t
        result = {
            "benchmark": "compass-monitor tui: first paint, memory, commit-to-display delay",
            "machine": machine(),
            "large_run": {"matrices": args.matrices, "snapshots": args.snapshots, "build_s": build_s},
            "goals": {"first_paint_s": 1.0, "rss_mb": 300, "commit_to_display_s": 1.0},
            "headless": asyncio.run(headless(big)),
            "terminal": terminal(big),
            "commit_to_display": asyncio.run(latency(tmp / "live", args.commits)),
            "note": "2-core shared CPU machine; single runs, expect +-20% noise",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "bench" / "results" / "tui_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
