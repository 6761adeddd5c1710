"""Run-store benchmark: bytes on disk vs the Shannon bound, write throughput, read latency,
and the training-step overhead of the background writer on a slow disk.

Part 1, mask streams. Qwen2-1.5B-shaped matrices (per layer: q and o 1536x1536,
k and v 256x1536, gate and up 8960x1536, down 1536x8960; 46.8M weights; the
default ``--layers 2`` uses 2 of the 28 layers). A synthetic stream of changed
masks per matrix: each snapshot flips a fraction f of the weights, f uniform
in [0.1%, 2%] (jittered +-30% per matrix), with more flips on than off so that
the density drifts from 0 to 0.5 (reached after about 80% of the snapshots)
and then churns. Two kinds: ``iid`` (every weight equally likely) and
``structured`` (flip probability proportional to a per-row times a per-column
log-normal weight, sigma 0.5: rows and columns change at different rates, as
in real runs). Every snapshot goes through ``RunWriter.append`` (the monitor's
writer) into a real store on this machine's disk.

The bound (bytes a lossless code of this stream needs at least, under the
model that each frame's bits are i.i.d. at the frame's own observed rate):
for a key frame ``n * H(|M_t| / n) / 8``, for a delta frame
``n * H(|M_t xor M_{t-1}| / n) / 8``, summed over matrices and snapshots,
with H the binary entropy. Stored bytes are the on-disk sizes (zstd-framed
chunk files) of ``masks/changed`` plus the frame index ``masks/frames``. For
the structured stream the i.i.d. bound is not a lower bound of the true
entropy (a coder that learns the row/column rates could go below it).
For comparison, the same stream is also compressed as (a) packed masks with
zstd level 1 (schema 1) and (b) packed XOR deltas with zstd level 1 with the
same key frames (the plain alternative to our Rice-coded positions).

Part 2, end to end. One Qwen2-1.5B-shaped layer trained with AdamW (fp32
master weights, a random regression target, ``--torch-threads`` 1 by default:
one core trains, the other is left to the writer, as on a GPU node where the
host has spare cores), snapshots every ``--every`` steps. Modes: no monitor;
the monitor with a writer that discards everything (the measurement pass
alone); the monitor with the background writer (queue 2, block) on a
simulated slow disk (each file write waits ``--disk-latency`` + size /
``--disk-mbps``, one file at a time, in zarr's I/O loop or in the
writer thread for the per-snapshot rows); and the monitor
writing synchronously (``writer_queue=0``) on the same slow disk. The modes are
interleaved: each round runs one snapshot interval of every mode (the
snapshot step first, then the plain steps during which a background writer
works), in rotating order, so that all modes see the same outside load on a
shared machine. The writer's overhead is the ratio of the background writer's
mean step time to the discarding writer's (also as the median of per-round
ratios).

Usage: python bench/bench_store.py [--layers 2] [--snapshots 64] [--key-interval 32] [--skip-e2e | --e2e-only]
Writes bench/results/store_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, KV = 1536, 8960, 256
LAYER = (("q", (HIDDEN, HIDDEN)), ("k", (KV, HIDDEN)), ("v", (KV, HIDDEN)), ("o", (HIDDEN, HIDDEN)),
         ("gate", (INTERMEDIATE, HIDDEN)), ("up", (INTERMEDIATE, HIDDEN)), ("down", (HIDDEN, INTERMEDIATE)))
FLIP_RANGE = (0.001, 0.02)


def machine_info() -> dict:
    import torch
    import zarr

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }


# -- part 1: mask streams -------------------------------------------------------------------
class MatrixStream:
    """One matrix's evolving changed mask, kept packed, with row/column counts kept incrementally."""

    def __init__(self, shape: tuple[int, int], rng: np.random.Generator, structured: bool) -> None:
        self.m, self.n = shape
        self.numel = self.m * self.n
        self.packed = np.zeros((self.numel + 7) // 8, dtype=np.uint8)
        self.rows = np.zeros(self.m, dtype=np.int64)
        self.cols = np.zeros(self.n, dtype=np.int64)
        self.ones = 0
        self.rng = rng
        self.structured = structured
        if structured:
            self.row_cdf = np.cumsum(w := rng.lognormal(0, 0.5, self.m)) / w.sum()
            self.col_cdf = np.cumsum(w := rng.lognormal(0, 0.5, self.n)) / w.sum()

    def _sample(self, count: int) -> np.ndarray:
        if not self.structured:
            return self.rng.integers(0, self.numel, count)
        rows = np.minimum(np.searchsorted(self.row_cdf, self.rng.random(count)), self.m - 1)
        cols = np.minimum(np.searchsorted(self.col_cdf, self.rng.random(count)), self.n - 1)
        return rows * self.n + cols

    def _bits(self, positions: np.ndarray) -> np.ndarray:
        return (self.packed[positions >> 3] >> (7 - (positions & 7))) & 1

    def _pick(self, count: int, bit: int, share: float) -> np.ndarray:
        if count <= 0:
            return np.zeros(0, dtype=np.int64)
        out = np.zeros(0, dtype=np.int64)
        for _ in range(4):
            candidates = self._sample(int(count / max(share, 0.02) * 1.3) + 64)
            _, first = np.unique(candidates, return_index=True)
            candidates = candidates[np.sort(first)]
            candidates = candidates[self._bits(candidates) == bit]
            out = np.concatenate([out, candidates[~np.isin(candidates, out)]])[:count]
            if out.size >= count:
                break
        return out

    def step(self, flip_rate: float, target_density: float) -> int:
        """Flip about flip_rate * numel weights, steering the density to target. Returns the flips."""
        density = self.ones / self.numel
        beta = float(np.clip((target_density - density) / flip_rate, -1, 1))
        total = int(round(flip_rate * self.numel))
        n_on = int(round(total * (1 + beta) / 2))
        on = self._pick(n_on, 0, 1 - density)
        off = self._pick(total - n_on, 1, density) if self.ones else np.zeros(0, np.int64)
        flips = np.concatenate([on, off])
        np.bitwise_xor.at(self.packed, flips >> 3, (128 >> (flips & 7)).astype(np.uint8))
        self.rows += np.bincount(on // self.n, minlength=self.m) - np.bincount(off // self.n, minlength=self.m)
        self.cols += np.bincount(on % self.n, minlength=self.n) - np.bincount(off % self.n, minlength=self.n)
        self.ones += on.size - off.size
        return int(flips.size)


def dir_bytes(path: Path) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, files) of the plain files under ``path``."""
    apparent = allocated = files = 0
    if not path.exists():
        return 0, 0, 0
    for root, _, names in os.walk(path):
        for name in names:
            if name.endswith("zarr.json") or name.endswith(".partial"):
                continue
            st = os.stat(os.path.join(root, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return apparent, allocated, files


def bench_stream(kind: str, args, workdir: Path) -> dict:
    from numcodecs import Zstd

    from compass_monitor.store import RunWriter, codec, open_run, schema
    from compass_monitor.store.writer import SnapshotRecord

    from compass_monitor.matrix_spec import MatrixSpec

    specs = [MatrixSpec(f"model.layers.{l}.{t}_proj.weight", "linear", t, l, s) for l in range(args.layers) for t, s in LAYER]
    rng = np.random.default_rng(args.seed + (kind == "structured"))
    streams = [MatrixStream(s.shape, rng, kind == "structured") for s in specs]
    numel = np.array([s.numel for s in streams])
    path = workdir / f"store_{kind}"
    writer = RunWriter.create(path, params=specs, attributes={"bench": kind}, key_interval=args.key_interval)
    zstd = Zstd(level=1)
    bound_bits = 0.0
    bound_key_bits = 0.0
    alt_packed = alt_xor = 0
    write_seconds = []
    flip_rates, previous = [], [s.packed.copy() for s in streams]
    t_count = args.snapshots
    for t in range(t_count):
        rate = rng.uniform(*FLIP_RANGE)
        target = min(0.5, 0.5 * (t + 1) / (0.8 * t_count))
        flips = []
        for s in streams:
            flips.append(s.step(float(np.clip(rate * rng.uniform(0.7, 1.3), *FLIP_RANGE)), target))
        counts = np.zeros((len(streams), len(schema.COUNT_FIELDS)), dtype=np.int64)
        counts[:, 0] = [s.ones for s in streams]
        counts[:, 4] = flips
        record = SnapshotRecord(
            step=10 * (t + 1),
            wall_time=time.time(),
            counts=counts,
            null_overlap=np.zeros((len(streams), 3)),
            rows=[s.rows.astype(np.int32) for s in streams],
            cols=[s.cols.astype(np.int32) for s in streams],
            packed=[s.packed.copy() for s in streams],
        )
        key = writer.is_key(t)
        for s, f, prev in zip(streams, flips, previous):
            if key:
                h = codec.binary_entropy(s.ones / s.numel) * s.numel
                bound_key_bits += h
            else:
                h = codec.binary_entropy(f / s.numel) * s.numel
            bound_bits += h
            if args.alternatives:
                alt_packed += len(zstd.encode(s.packed))
                alt_xor += len(zstd.encode(s.packed if key else np.bitwise_xor(s.packed, prev)))
        flip_rates.append(float(np.sum(flips) / numel.sum()))
        start = time.perf_counter()
        writer.append(record)
        write_seconds.append(time.perf_counter() - start)
        previous = record.packed
        print(f"  {kind} snapshot {t + 1}/{t_count}: density {sum(s.ones for s in streams) / numel.sum():.3f}, "
              f"flips {flip_rates[-1]:.4f}, write {write_seconds[-1]:.3f} s", file=sys.stderr, flush=True)
    writer.finalize()

    sizes = {}
    for label, sub in (("mask_payload", schema.CHANGED_PREFIX), ("mask_index", schema.FRAMES), ("previews", schema.PREVIEW_PREFIX),
                       ("rows", schema.ROWS_PREFIX), ("cols", schema.COLS_PREFIX), ("metrics", "metrics"), ("steps", "snapshots")):
        apparent, allocated, files = dir_bytes(path / sub)
        sizes[label] = {"apparent": apparent, "allocated": allocated, "files": files}
    mask_bytes = sizes["mask_payload"]["apparent"] + sizes["mask_index"]["apparent"]
    per_snapshot_total = sum(v["apparent"] for v in sizes.values()) / t_count
    bound_bytes = bound_bits / 8

    # Reading: the largest matrix, worst random access (a whole key interval of deltas), then a scan.
    big = int(np.argmax(numel))
    worst = min(args.key_interval, t_count) - 1
    run = open_run(path)
    start = time.perf_counter()
    run.mask(big, worst)
    random_worst = time.perf_counter() - start
    run = open_run(path)
    start = time.perf_counter()
    for t in range(t_count):
        run.packed_mask(big, t)
    scan = (time.perf_counter() - start) / t_count
    start = time.perf_counter()
    for t in range(t_count):
        run.preview(big, t)
    preview_read = (time.perf_counter() - start) / t_count

    total_weights = int(numel.sum())
    seconds = float(np.sum(write_seconds))
    result = {
        "kind": kind,
        "matrices": len(streams),
        "weights": total_weights,
        "snapshots": t_count,
        "key_interval": args.key_interval,
        "final_density": float(sum(s.ones for s in streams) / total_weights),
        "mean_flip_rate": float(np.mean(flip_rates)),
        "bound_bytes": bound_bytes,
        "bound_bytes_of_key_frames": bound_key_bits / 8,
        "stored_mask_bytes": mask_bytes,
        "ratio_vs_bound": mask_bytes / bound_bytes,
        "ratio_vs_bound_payload_only": sizes["mask_payload"]["apparent"] / bound_bytes,
        "ratio_vs_bound_allocated_blocks": (sizes["mask_payload"]["allocated"] + sizes["mask_index"]["allocated"]) / bound_bytes,
        "per_snapshot_bytes": {
            "masks": mask_bytes / t_count,
            "bound": bound_bytes / t_count,
            "masks_bits_per_weight": 8 * mask_bytes / t_count / total_weights,
            "all_arrays": per_snapshot_total,
            "packed_uncompressed": total_weights / 8,
        },
        "sizes": sizes,
        "write": {
            "seconds_total": seconds,
            "seconds_per_snapshot_mean": seconds / t_count,
            "seconds_per_snapshot_max": float(np.max(write_seconds)),
            "seconds_key_snapshot_mean": float(np.mean([w for i, w in enumerate(write_seconds) if i % args.key_interval == 0])),
            "weights_per_second": total_weights * t_count / seconds,
            "packed_mb_per_second": total_weights / 8 * t_count / seconds / 1e6,
        },
        "read": {
            "matrix": specs[big].name,
            "random_access_worst_seconds": random_worst,
            "random_access_worst_frames": worst + 1,
            "sequential_seconds_per_snapshot": scan,
            "preview_seconds": preview_read,
        },
    }
    if args.alternatives:
        result["alternatives"] = {
            "zstd1_packed_masks_ratio_vs_bound": alt_packed / bound_bytes,
            "zstd1_packed_xor_deltas_ratio_vs_bound": alt_xor / bound_bytes,
        }
    shutil.rmtree(path, ignore_errors=True)
    return result


# -- part 2: end to end ------------------------------------------------------------------------
def bench_e2e(args, workdir: Path) -> dict:
    import torch
    from torch import nn
    from zarr.storage import LocalStore

    from compass_monitor import CompassMonitor, MonitorConfig
    from compass_monitor.integrations.pytorch import attach_optimizer
    from compass_monitor.store.row_chunks import RowChunks
    from compass_monitor.store.writer import RunWriter

    torch.set_num_threads(args.torch_threads)  # default 1: one core trains, one is left for the writer thread

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, (m, n) in LAYER:
                setattr(self, f"{name}_proj", nn.Linear(n, m, bias=False))
            for p in self.parameters():
                nn.init.normal_(p, std=0.02)

        def forward(self, x):
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            h = x + self.o_proj(q * k.repeat(1, HIDDEN // KV) * v.repeat(1, HIDDEN // KV))
            return h + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))

    original_set = LocalStore.set
    slow = {"on": set(), "files": 0, "bytes": 0, "lock": None}

    async def slow_set(self, key, value):
        if str(self.root) in slow["on"]:
            # One file at a time (a serial device): concurrent writes queue behind each other.
            if slow["lock"] is None:
                slow["lock"] = asyncio.Lock()
            async with slow["lock"]:
                slow["files"] += 1
                slow["bytes"] += len(value)
                await asyncio.sleep(args.disk_latency + len(value) / (args.disk_mbps * 1e6))
        return await original_set(self, key, value)

    LocalStore.set = slow_set
    # The per-snapshot rows bypass LocalStore.set (store/row_chunks.py); the same serial device slows them.
    original_file = RowChunks._store_file
    device = threading.Lock()

    def slow_file(path, payload, pid=0):
        if any(str(path).startswith(root) for root in slow["on"]):
            with device:
                slow["files"] += 1
                slow["bytes"] += len(payload)
                time.sleep(args.disk_latency + len(payload) / (args.disk_mbps * 1e6))
        return original_file(path, payload, pid)

    RowChunks._store_file = staticmethod(slow_file)
    original_append = RunWriter.append

    def discarding_append(self, record):
        if str(self.path) in discard:
            return None
        return original_append(self, record)

    discard: set[str] = set()
    RunWriter.append = discarding_append

    modes = ["no monitor", "discard writer", "background writer, slow disk", "sync writer, slow disk"]
    setups = {}
    for mode in modes:
        torch.manual_seed(0)
        model = Layer()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        monitor = None
        if mode != "no monitor":
            path = workdir / f"e2e_{modes.index(mode)}"
            config = MonitorConfig(
                every_n_steps=args.every,
                principal_rank=64,
                writer_queue=0 if mode.startswith("sync") else 2,
                key_interval=args.key_interval,
            )
            monitor = CompassMonitor(model, path, config=config)
            monitor.flush()  # the base is written before timing starts
            attach_optimizer(monitor, optimizer)
            if mode == "discard writer":
                discard.add(str(path))
            if mode.endswith("slow disk"):
                slow["on"].add(str(path))
        g = torch.Generator().manual_seed(1)
        setups[mode] = {
            "model": model, "optimizer": optimizer, "monitor": monitor,
            "x": torch.randn(args.tokens, HIDDEN, generator=g), "target": torch.randn(args.tokens, HIDDEN, generator=g),
            "steps": [], "snapshot_steps": [], "flush_after_block": [],
        }

    def step(setup) -> float:
        start = time.perf_counter()
        setup["optimizer"].zero_grad()
        (setup["model"](setup["x"]) - setup["target"]).pow(2).mean().backward()
        setup["optimizer"].step()
        return time.perf_counter() - start

    # Warm-up: every mode runs to one step before its first snapshot (untimed).
    for mode in modes:
        for _ in range(args.every - 1):
            step(setups[mode])
    # Rounds: each mode in turn runs one snapshot interval (the snapshot step first, then every-1 plain
    # steps during which a background writer works), so all modes see the same outside load.
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        print(f"  e2e round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for mode in order:
            setup = setups[mode]
            block = [step(setup) for _ in range(args.every)]
            setup["snapshot_steps"].append(block[0])
            setup["steps"].extend(block)
            start = time.perf_counter()
            if setup["monitor"] is not None:
                setup["monitor"].flush()  # what the writer still needed after the interval (not a step cost)
            setup["flush_after_block"].append(time.perf_counter() - start)
    for mode in modes:
        monitor = setups[mode]["monitor"]
        if monitor is not None:
            monitor.close()
            setups[mode]["snapshots"] = monitor.writer.num_snapshots
    LocalStore.set = original_set
    RowChunks._store_file = staticmethod(original_file)
    RunWriter.append = original_append
    base_dir = workdir / "e2e_2" / "base" / "weights"
    weights = sum(m * n for _, (m, n) in LAYER)
    blocks = args.every

    def mean(mode: str, key: str = "steps") -> float:
        return float(np.mean(setups[mode][key]))

    def paired(a: str, b: str) -> float:
        """Median over rounds of the ratio of the two modes' mean step times in that round."""
        sa, sb = np.array(setups[a]["steps"]).reshape(-1, blocks), np.array(setups[b]["steps"]).reshape(-1, blocks)
        return float(np.median(sa.mean(axis=1) / sb.mean(axis=1)))

    return {
        "model": f"one Qwen2-1.5B-shaped layer ({weights / 1e6:.1f}M weights, fp32 master, AdamW lr {args.lr}), {args.torch_threads} torch thread(s)",
        "tokens_per_step": args.tokens,
        "rounds": args.rounds,
        "every_n_steps": args.every,
        "design": "modes interleaved: each round runs one snapshot interval of every mode in rotating order",
        "slow_disk": {"latency_seconds_per_file": args.disk_latency, "megabytes_per_second": args.disk_mbps, "serial": True,
                      "files_written": slow["files"], "bytes_written": slow["bytes"]},
        "mean_step_seconds": {mode: mean(mode) for mode in modes},
        "mean_snapshot_step_seconds": {mode: mean(mode, "snapshot_steps") for mode in modes},
        "writer_still_busy_after_interval_seconds": {mode: mean(mode, "flush_after_block") for mode in modes[1:]},
        "writer_overhead_ratio": mean("background writer, slow disk") / mean("discard writer"),
        "writer_overhead_ratio_paired_median": paired("background writer, slow disk", "discard writer"),
        "sync_writer_ratio": mean("sync writer, slow disk") / mean("discard writer"),
        "sync_writer_ratio_paired_median": paired("sync writer, slow disk", "discard writer"),
        "monitor_overhead_ratio": mean("background writer, slow disk") / mean("no monitor"),
        "monitor_overhead_ratio_paired_median": paired("background writer, slow disk", "no monitor"),
        "measurement_only_ratio": mean("discard writer") / mean("no monitor"),
        "snapshots_written": {mode: setups[mode].get("snapshots") for mode in modes[1:]},
        "base_weights_bytes_per_weight": (dir_bytes(base_dir)[0] / weights) if base_dir.exists() else None,
        "step_seconds": {mode: setups[mode]["steps"] for mode in modes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="Qwen2-1.5B layers in the mask streams (of 28; default 2)")
    parser.add_argument("--snapshots", type=int, default=64)
    parser.add_argument("--key-interval", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="structured,iid")
    parser.add_argument("--no-alternatives", dest="alternatives", action="store_false", help="skip the zstd comparisons")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--rounds", type=int, default=6, help="e2e: rounds of one snapshot interval per mode")
    parser.add_argument("--torch-threads", type=int, default=1, help="e2e: torch intra-op threads (default 1)")
    parser.add_argument("--e2e-only", action="store_true", help="run only part 2 and merge it into --out")
    parser.add_argument("--every", type=int, default=5, help="e2e: snapshot every N steps")
    parser.add_argument("--tokens", type=int, default=64, help="e2e: rows of the batch")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--disk-latency", type=float, default=0.02, help="e2e: simulated seconds per file write")
    parser.add_argument("--disk-mbps", type=float, default=50.0, help="e2e: simulated disk bandwidth, MB/s")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "store_cpu.json"))
    parser.add_argument("--workdir", default=None, help="where the stores are written (default: a temporary directory)")
    args = parser.parse_args()

    machine = machine_info()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_store_"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine,
        "workdir_filesystem": os.popen(f"df -T {workdir} | tail -1").read().split()[1:2],
        "args": vars(args),
        "streams": {},
    }
    if args.e2e_only and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        result["streams"] = previous.get("streams", {})
        result["machine_streams"] = previous.get("machine")
    try:
        for kind in ([] if args.e2e_only else args.kinds.split(",")):
            print(f"stream {kind}", file=sys.stderr, flush=True)
            result["streams"][kind] = bench_stream(kind, args, workdir)
        if not args.skip_e2e:
            result["e2e"] = bench_e2e(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for kind, r in result["streams"].items():
        print(
            f"{kind}: {r['per_snapshot_bytes']['masks'] / 1e3:.1f} kB/snapshot of masks vs bound "
            f"{r['per_snapshot_bytes']['bound'] / 1e3:.1f} kB: {r['ratio_vs_bound']:.3f}x "
            f"(zstd packed {r.get('alternatives', {}).get('zstd1_packed_masks_ratio_vs_bound', float('nan')):.2f}x, "
            f"zstd xor {r.get('alternatives', {}).get('zstd1_packed_xor_deltas_ratio_vs_bound', float('nan')):.2f}x); "
            f"write {r['write']['packed_mb_per_second']:.0f} MB/s packed ({r['write']['weights_per_second'] / 1e9:.2f} G weights/s)"
        )
    if "e2e" in result:
        e = result["e2e"]
        print(f"e2e: step {e['mean_step_seconds']}; writer overhead {e['writer_overhead_ratio']:.3f}x "
              f"(paired {e['writer_overhead_ratio_paired_median']:.3f}x), sync writer {e['sync_writer_ratio']:.3f}x, "
              f"monitor total {e['monitor_overhead_ratio']:.3f}x; base W0 {e['base_weights_bytes_per_weight']:.2f} B/weight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
