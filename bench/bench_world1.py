"""Base capture and snapshot cost of a plain model in one process (world size 1), public API only.

Runs unchanged on any version of compass-monitor, so two checkouts can be
timed side by side (e.g. before and after a refactor of the core) with the
same command. Prints one JSON line: seconds to create the monitor (base
capture: the bf16 base, principal and low masks, class counts, the store) and
median seconds of a snapshot hand-off and of a committed snapshot.

Model: Qwen2-0.5B-shaped linear layers (hidden 896, intermediate 4864, GQA
k/v 128), ``--layers`` blocks, bf16 weights, 30% drift per snapshot.

    python bench/bench_world1.py --layers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig


class Block(nn.Module):
    def __init__(self, hidden: int = 896, inter: int = 4864, kv: int = 128) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, kv), nn.Linear(hidden, kv)
        self.o_proj = nn.Linear(hidden, hidden)
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter), nn.Linear(hidden, inter)
        self.down_proj = nn.Linear(inter, hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--snapshots", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.ModuleList([Block() for _ in range(args.layers)]).to(torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="compass-w1-") as tmp:
        t0 = time.perf_counter()
        monitor = CompassMonitor(model, Path(tmp) / "run", config=MonitorConfig(every_n_steps=1))
        monitor.flush()
        base_s = time.perf_counter() - t0
        handoff, committed = [], []
        for step in range(1, args.snapshots + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(((torch.rand_like(p, dtype=torch.float32) < 0.3) * p.float() * 0.01).to(p.dtype))
            t = time.perf_counter()
            monitor.snapshot(step)
            handoff.append(time.perf_counter() - t)
            monitor.flush()
            committed.append(time.perf_counter() - t)
        monitor.close()
        assert monitor.disabled_reason is None, monitor.disabled_reason
    print(json.dumps({"base_capture_s": base_s, "snapshot_handoff_s": statistics.median(handoff), "snapshot_committed_s": statistics.median(committed)}))


if __name__ == "__main__":
    main()
