"""Peak memory of ``compass-monitor diff`` as the model grows: W0 reread (default) vs W0 held (``hold_base``).

The pairs are the Qwen2-1.5B-shaped synthetic checkpoints of
``bench_posthoc.py`` (hidden 1536, intermediate 8960, bf16, one shard per
layer with an index), at several layer counts. Each (layers, mode) runs
``diff_checkpoints`` on base + one checkpoint in its own process (peak RSS is
that process's VmHWM), side by side in one run:

* ``reread``: the default; the probe keeps no W0 and spills its masks to a file;
* ``held``: ``hold_base=True``, the live monitor's layout (2 bytes of W0 and
  4 bits of masks per weight in memory).

The bound to read: the growth of peak RSS per added layer against the layer's
bf16 bytes. The base capture works on groups of consecutive matrices of up to
``probe.BASE_GROUP_ELEMENTS`` (64M) weights, about 30 bytes of temporaries per
weight of a group; a group fills up by two Qwen2-1.5B layers (47M weights
each), so the layer counts compared start at 2. Both modes write the same
store (checked here on the stored counts).

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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_posthoc import HIDDEN, INTERMEDIATE, _peak_rss, evict, write_pair  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(root: Path, mode: str) -> dict:
    from compass_monitor import MonitorConfig
    from compass_monitor.checkpoints import diff_checkpoints, resolve_steps
    from compass_monitor.store import open_run

    out = root / f"run-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    evict(root)
    t0 = time.perf_counter()
    result = diff_checkpoints(root / "base", resolve_steps([root / "checkpoint-100"]), out, config=MonitorConfig(principal_rank=64, snapshot_on_close=False),
                              progress=False, device="cpu", hold_base=(mode == "held"))
    seconds = time.perf_counter() - t0
    run = open_run(out)
    return {"seconds": seconds, "base": result.seconds["base"], "snapshot": result.seconds["step 100"],
            "monitored_weights": sum(s.numel for s in result.specs), "largest_matrix_weights": max(s.numel for s in result.specs),
            "changed": run.counts[0, :, 0].tolist(), "peak_rss": _peak_rss()}


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
