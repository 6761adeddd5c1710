"""Per-snapshot cost of the monitor vs one numpy pass over the same bytes.

Baseline ("floor"): ``np.not_equal`` on int16 views of the base and current
bf16 weights, i.e. reading both copies once and writing one byte per weight:
the least any exact changed-mask pass can do on this machine. Ours: the
monitor's full per-snapshot work (compare, pack, row/column counts, overlap
popcounts, flip counts, precision null) and, separately, the same plus the
synchronous store write. Both are timed side by side in one process, on
Qwen2-0.5B-shaped matrices (hidden 896, intermediate 4864, k/v 128 x 896).

Usage: python bench/bench_snapshot_cpu.py [--layers 4] [--repeats 5] [--master fp32|bf16]
Writes bench/results/snapshot_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig
from compass_monitor.matrix_probe import measure_range

HIDDEN, INTERMEDIATE, KV = 896, 4864, 128


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--master", choices=("fp32", "bf16"), default="bf16", help="dtype of the live weights")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "snapshot_cpu.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.ModuleList([Block() for _ in range(args.layers)])
    if args.master == "bf16":
        model = model.to(torch.bfloat16)
    workdir = Path(tempfile.mkdtemp(prefix="compass-bench-"))
    try:
        monitor = CompassMonitor(model, workdir / "run", config=MonitorConfig(every_n_steps=1))
        params = [shard.values() for shard in monitor.probe.layout.shards]  # the monitored tensors (flat views), in store order
        # Drift 30% of the weights by one bf16 ulp-ish relative step, as a training step would.
        with torch.no_grad():
            for p in params:
                drift = (torch.rand_like(p, dtype=torch.float32) < 0.3) * p.float() * 0.01
                p.add_(drift.to(p.dtype))
        numel = sum(p.numel() for p in params)
        base_np = [s.base_bits.numpy() for s in monitor.probe.states]
        cur_np = [p.detach().to(torch.bfloat16).view(torch.int16).numpy() for p in params]

        def numpy_floor() -> None:
            for b, c in zip(base_np, cur_np):
                np.not_equal(b, c)

        def ours_compute() -> None:
            for state in monitor.probe.states:
                measure_range(state, state.shard.spec.shape)

        step = [0]

        def ours_handoff() -> None:
            step[0] += 1
            monitor.snapshot(step[0])  # what the training thread pays (the writer thread encodes and writes)

        def ours_with_store() -> None:
            step[0] += 1
            monitor.snapshot(step[0])
            monitor.flush()  # until the snapshot is committed on disk

        floor = best_of(numpy_floor, args.repeats)
        compute = best_of(ours_compute, args.repeats)
        full = best_of(ours_with_store, args.repeats)
        monitor.flush()
        handoff = best_of(ours_handoff, args.repeats)
        monitor.flush()
        assert monitor.enabled, monitor.disabled_reason
        monitor.close()
        store_bytes = sum(f.stat().st_size for f in (workdir / "run").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "benchmark": "per-snapshot monitor cost vs numpy not_equal floor",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": torch.get_num_threads(),
            "device": "cpu",
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "shapes": f"Qwen2-0.5B-shaped, {args.layers} layers x (q, k, v, o, gate, up, down)",
        "master_dtype": args.master,
        "weights": numel,
        "repeats": args.repeats,
        "seconds_best": {
            "numpy_not_equal_floor": floor,
            "monitor_compute": compute,
            "monitor_snapshot_training_thread": handoff,
            "monitor_compute_and_store_committed": full,
        },
        "ratio_vs_floor": {
            "monitor_compute": compute / floor,
            "monitor_snapshot_training_thread": handoff / floor,
            "monitor_compute_and_store_committed": full / floor,
        },
        "load_average_1m_at_end": os.getloadavg()[0],
        "store_bytes_after_run": store_bytes,
        "note": "best of N in one process; CPU timings on a shared 2-core machine are noisy, read the ratios",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
