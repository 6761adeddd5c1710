"""Per-snapshot collective volume of the sharded monitor against the bytes of the weights.

Runs a Qwen-shaped stack of linear layers (q/o square, k/v wide, gate/up tall,
down wide) under FSDP2 ``fully_shard`` on W gloo ranks on this machine's CPU,
perturbs a fraction of every local shard (so the masks are not empty), and
takes snapshots. Records, per world size:

* every collective of one snapshot (op, dtype, bytes each rank sends), from
  the monitor's own record, and what rank 0 receives;
* the bytes of the local weights (fp32 master and bf16) on each rank, and the
  ratio of the snapshot's collective bytes to them;
* what a full-parameter all-gather of the bf16 weights would move instead;
* the one-time collectives at base capture (by op), and the wall time of a
  snapshot (median; 2 CPU cores shared by all ranks, so indicative only).

Usage::

    .venv/bin/python bench/bench_collectives.py [--worlds 2 4] [--layers 2] [--hidden 512]

Writes ``bench/results/collectives_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "collectives_cpu.json"


class Block(nn.Module):
    def __init__(self, hidden: int, kv: int, inter: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class Stack(nn.Module):
    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(hidden, hidden // 4, int(hidden * 2.75)) for _ in range(layers)])


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": "gloo (CPU, localhost)",
        "load_average_at_start": list(os.getloadavg()),
    }


def _worker(rank: int, world: int, port: int, out_dir: str, args: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _measure(rank, world, args, Path(out_dir))
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as handle:
            pickle.dump(result, handle)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _measure(rank: int, world: int, args: dict, out_dir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from compass_monitor import CompassMonitor, MonitorConfig

    torch.manual_seed(0)
    model = Stack(args["layers"], args["hidden"])
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    config = MonitorConfig(every_n_steps=1, principal_rank=args["rank"], store_base=args["store_base"], writer_queue=2)
    t0 = time.perf_counter()
    monitor = CompassMonitor(model, out_dir / "run", config=config)
    base_seconds = time.perf_counter() - t0
    comm = monitor.probe.comm
    base_records = [(r.phase, r.op, r.dtype, r.nbytes) for r in comm.records]
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(1, args["snapshots"] + 1):
        with torch.no_grad():
            for p in model.parameters():
                local = p.to_local()
                local.add_(torch.randn(local.shape, generator=gen) * 1e-3 * (torch.rand(local.shape, generator=gen) < 0.02 * step))
        comm.records.clear()
        dist.barrier()
        t = time.perf_counter()
        monitor.step = step
        monitor.snapshot()
        times.append(time.perf_counter() - t)
        snapshot_records = [(r.op, r.dtype, r.nbytes) for r in comm.records]
    monitor.close()
    assert monitor.disabled_reason is None, monitor.disabled_reason
    states = monitor.probe.states
    local_numel = sum(s.numel for s in states)
    return {
        "rank": rank,
        "local_weights": local_numel,
        "local_fp32_bytes": 4 * local_numel,
        "local_bf16_bytes": 2 * local_numel,
        "snapshot_collectives": snapshot_records,
        "snapshot_bytes_sent": sum(n for _, _, n in snapshot_records),
        "snapshot_seconds": times,
        "base_seconds": base_seconds,
        "base_collectives": base_records,
        "params": [(s.shard.spec.name, list(s.shard.spec.shape)) for s in states],
    }


def single_process(args: dict) -> dict:
    """The plain single-process monitor on the same model (no collectives), for the snapshot time."""
    from compass_monitor import CompassMonitor, MonitorConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Stack(args["layers"], args["hidden"])
    config = MonitorConfig(every_n_steps=1, principal_rank=args["rank"], store_base=args["store_base"], writer_queue=2)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        monitor = CompassMonitor(model, Path(tmp) / "run", config=config)
        base_seconds = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(0)
        times = []
        for step in range(1, args["snapshots"] + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 1e-3 * (torch.rand(p.shape, generator=gen) < 0.02 * step))
            t = time.perf_counter()
            monitor.step = step
            monitor.snapshot()
            times.append(time.perf_counter() - t)
        monitor.close()
    return {"world_size": 1, "monitor": "CompassMonitor (single process)", "snapshot_seconds_median": statistics.median(times), "base_capture_seconds": base_seconds}


def run_world(world: int, args: dict) -> list[dict]:
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.fsdp", "zarr", "compass_monitor.monitor"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, port, out_dir, args), nprocs=world, join=True, start_method="forkserver")
        return [pickle.load(open(Path(out_dir) / f"rank{r}.pkl", "rb")) for r in range(world)]


def summarize(world: int, ranks: list[dict]) -> dict:
    total = sum(r["local_weights"] for r in ranks)
    per_rank = []
    for r in ranks:
        sent = r["snapshot_bytes_sent"]
        per_rank.append(
            {
                "rank": r["rank"],
                "local_weights": r["local_weights"],
                "snapshot_bytes_sent": sent,
                "ratio_to_local_bf16": sent / r["local_bf16_bytes"],
                "ratio_to_local_fp32": sent / r["local_fp32_bytes"],
                "snapshot_seconds_median": statistics.median(r["snapshot_seconds"]),
            }
        )
    gather = [n for op, _, n in ranks[0]["snapshot_collectives"] if op == "gather"]
    base: dict[str, int] = {}
    for _, op, _, n in ranks[0]["base_collectives"]:
        base[op] = base.get(op, 0) + n
    return {
        "world_size": world,
        "weights_total": total,
        "weights_bf16_bytes_total": 2 * total,
        "weights_fp32_bytes_total": 4 * total,
        "snapshot_collectives_rank0": [{"op": op, "dtype": dtype, "bytes": n} for op, dtype, n in ranks[0]["snapshot_collectives"]],
        "rank0_receives_bytes": (world - 1) * (gather[0] if gather else 0),
        "per_rank": per_rank,
        "full_bf16_all_gather_bytes_per_rank": 2 * total * (world - 1) // world,
        "base_capture_seconds_rank0": ranks[0]["base_seconds"],
        "base_collectives_rank0_bytes_by_op": base,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64, help="principal_rank")
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--no-store-base", dest="store_base", action="store_false", help="MonitorConfig(store_base=False): no gather of W0's codes to rank 0 at base time")
    parser.add_argument("--out", type=Path, default=RESULTS)
    ns = parser.parse_args(argv)
    args = {"layers": ns.layers, "hidden": ns.hidden, "rank": ns.rank, "snapshots": ns.snapshots, "store_base": ns.store_base}
    results = []
    single = single_process(args)
    print(f"W=1 (single process): snapshot {single['snapshot_seconds_median'] * 1e3:.1f} ms, base {single['base_capture_seconds']:.1f} s", flush=True)
    for world in ns.worlds:
        t = time.time()
        summary = summarize(world, run_world(world, args))
        results.append(summary)
        pr = summary["per_rank"][0]
        print(
            f"W={world}: {summary['weights_total']:,} weights; per snapshot rank 0 sends {pr['snapshot_bytes_sent']:,} B "
            f"({pr['ratio_to_local_bf16']:.4f} of its bf16 shard), receives {summary['rank0_receives_bytes']:,} B; "
            f"a bf16 all-gather would move {summary['full_bf16_all_gather_bytes_per_rank']:,} B per rank; "
            f"snapshot {pr['snapshot_seconds_median'] * 1e3:.1f} ms ({time.time() - t:.0f} s)",
            flush=True,
        )
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_collectives",
        "what": "collective bytes per snapshot of the sharded monitor (FSDP2 fully_shard, gloo on localhost CPU) vs the bytes of the weights",
        "machine": _machine(),
        "model": {"layers": ns.layers, "hidden": ns.hidden, "principal_rank": ns.rank, "store_base": ns.store_base, "shapes": run_shapes(ns)},
        "single_process": single,
        "results": results,
        "created": time.time(),
        "note": "timings share 2 CPU cores among all ranks (and with other jobs: see load_average_at_start); the byte counts are exact",
    }
    ns.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {ns.out}")


def run_shapes(ns) -> list:
    model = Stack(1, ns.hidden)
    return [[name, list(p.shape)] for name, p in model.named_parameters()]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
