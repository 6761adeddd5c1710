"""Peak memory of ``compass-monitor diff`` as the model grows: W0 reread (default) vs W0 held (``hold_base``).

The pairs are the Qwen2-1.5B-shaped synthetic checkpoints of
``bench_posthoc.py`` (hidden 1536, intermediate 8960, bf16, one shard per
layer with an index), at several layer counts. Each (layers, mode) runs
``diff_checkpoints`` on base + one checkpoint in its own process (peak RSS is
that process's VmHWM), side by side in one run:

* ``reread``: the default; the probe keeps no W0 and spills its masks to a file;
* ``held``: ``hold_base=True``, the live monitor's layout (2 bytes of W0 and
  4 bits of masks per weight in memory).

The bound to read: peak RSS against the number of layers. With W0 reread the
base capture works on groups of consecutive matrices of at most the largest
matrix's weights (``probe._base_groups``), so its peak is set by the largest
matrix (the 8960 x 1536 MLP projections here), not by the model; with W0 held
the groups go up to ``probe.BASE_GROUP_ELEMENTS`` (64M) weights and W0 plus its
masks stay in memory. Peak RSS is VmHWM; the sampled peaks of RssAnon and
RssFile split it into what the process allocated and the memory-mapped
checkpoint pages (clean page cache the kernel may drop). Both modes write the
same store (checked here on the stored counts).

Usage: python bench/bench_posthoc_memory.py [--layers 2 6] [--workdir DIR]
Writes bench/results/posthoc_memory_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_posthoc import HIDDEN, INTERMEDIATE, _peak_rss, evict, write_pair  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class RssSampler:
    """Peaks of this process's anonymous and file-backed resident memory, sampled every ``interval`` s.

    VmHWM counts the memory-mapped checkpoint pages too (RssFile: clean page cache the
    kernel can drop under pressure); RssAnon is what the process itself allocated.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def measure(root: Path, mode: str) -> dict:
    from compass_monitor import MonitorConfig
    from compass_monitor.checkpoints import diff_checkpoints, resolve_steps
    from compass_monitor.store import open_run

    out = root / f"run-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    evict(root)
    t0 = time.perf_counter()
    with RssSampler() as rss:
        result = diff_checkpoints(root / "base", resolve_steps([root / "checkpoint-100"]), out, config=MonitorConfig(principal_rank=64, snapshot_on_close=False),
                                  progress=False, device="cpu", hold_base=(mode == "held"))
    seconds = time.perf_counter() - t0
    run = open_run(out)
    return {"seconds": seconds, "base": result.seconds["base"], "snapshot": result.seconds["step 100"],
            "monitored_weights": sum(s.numel for s in result.specs), "largest_matrix_weights": max(s.numel for s in result.specs),
            "changed": run.counts[0, :, 0].tolist(), "peak_rss": _peak_rss(),
            "peak_rss_anon_sampled": rss.peak["RssAnon"], "peak_rss_file_sampled": rss.peak["RssFile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._mode:
        print(json.dumps(measure(Path(args.workdir), args._mode)))
        return
    top = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_posthoc_memory_"))
    rows = []
    try:
        for layers in args.layers:
            root = top / f"layers-{layers}"
            if not (root / "checkpoint-100" / "model.safetensors.index.json").is_file():
                write_pair(root, layers)
            for mode in ("reread", "held"):
                cmd = [sys.executable, __file__, "--_mode", mode, "--workdir", str(root)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"layers {layers} {mode}: exit status {done.returncode}\n{done.stderr[-4000:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                r.update(layers=layers, mode=mode)
                print(f"layers {layers} {mode:>6}: {r['seconds']:7.1f} s, peak RSS {r['peak_rss'] / 2**20:7.0f} MiB", file=sys.stderr, flush=True)
                rows.append(r)
            if not args.workdir:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(top, ignore_errors=True)
    by = {(r["layers"], r["mode"]): r for r in rows}
    same = all(by[(n, "reread")]["changed"] == by[(n, "held")]["changed"] for n in args.layers)
    lo, hi = min(args.layers), max(args.layers)
    layer_bytes = 2 * (by[(hi, "held")]["monitored_weights"] - by[(lo, "held")]["monitored_weights"]) / max(hi - lo, 1)
    growth = {mode: (by[(hi, mode)]["peak_rss"] - by[(lo, mode)]["peak_rss"]) / max(hi - lo, 1) for mode in ("reread", "held")}
    import torch

    report = {
        "benchmark": "compass-monitor diff peak memory vs model size: W0 reread (default) vs held",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": "cpu", "torch": torch.__version__,
                    "load_average_1m": os.getloadavg()[0]},
        "model": f"Qwen2-1.5B-shaped decoder layers (hidden {HIDDEN}, intermediate {INTERMEDIATE}), bf16 synthetic, embeddings not monitored",
        "rows": [{k: v for k, v in r.items() if k != "changed"} for r in rows],
        "per_added_layer": {
            "layer_bf16_bytes": layer_bytes,
            "peak_rss_growth_bytes": growth,
            "growth_vs_layer_bytes": {mode: g / layer_bytes for mode, g in growth.items()},
        },
        "peak_rss_vs_model_bf16_bytes": {f"{n} {mode}": by[(n, mode)]["peak_rss"] / (2 * by[(n, mode)]["monitored_weights"]) for n in args.layers for mode in ("reread", "held")},
        "largest_matrix_bf16_bytes": 2 * by[(hi, "held")]["largest_matrix_weights"],
        "peak_rss_reread_vs_held": {str(n): by[(n, "reread")]["peak_rss"] / by[(n, "held")]["peak_rss"] for n in args.layers},
        "seconds_reread_vs_held": {str(n): by[(n, "reread")]["seconds"] / by[(n, "held")]["seconds"] for n in args.layers},
        "stores_equal_counts": same,
        "note": "one run, each measurement in its own process, page cache evicted first; read the ratios",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "posthoc_memory_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
