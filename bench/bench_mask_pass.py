"""The per-snapshot mask pass: fused Triton kernel vs plain torch ops vs torch.compile vs the read floor.

One "pass" measures every monitored matrix of a model once, as a snapshot
does: changed mask (Def. 2.2), packed mask, row and column counts, the six
count fields. Timed side by side in one process, on the same tensors:

* ``fused``: ``compass_monitor.kernels.fused_mask_pass`` (one Triton kernel and
  one memset per matrix; what the probe runs on CUDA with triton);
* ``fused_group``: ``fused_mask_pass_many``, the same kernel over every matrix
  of the pass in one launch per weight dtype (a table of pointers);
* ``torch``: the probe's plain torch branch (``_measure_range(backend="torch")``);
* ``compile``: the same torch ops under ``torch.compile(dynamic=True)``;
* ``floor``: a Triton kernel that only reads the same inputs once (current
  weights, bf16 base codes, the three packed reference masks and the previous
  mask) and reduces them to one word per program: the memory-bandwidth floor.

Each method runs ``--repeats`` passes after a warm-up (compilation outside the
timing), each pass ended by one ``torch.cuda.synchronize``; the median pass
time is reported, with the bytes read and the bandwidth they imply. On CUDA the
fused pass and the floor are also replayed from a CUDA graph (``*_graph``): the
device time without the host's per-matrix launches, so that eager minus replay
shows what launching matrix by matrix costs. The fused
outputs of the first matrices are checked equal to the torch branch's, and a
fused pass runs under ``torch.cuda.set_sync_debug_mode("error")`` (it raises if
anything inside synchronises with the host).

GPU: Qwen3-8B shapes (36 layers x q, k, v, o, gate, up, down: q/o 4096x4096,
k/v 1024x4096, gate/up 12288x4096, down 4096x12288; 6.95e9 weights), current
weights as fp32 masters and as bf16. Goal: fused <= 1.5x floor. Writes
bench/results/mask_pass_<gpu-name>.json.

CPU (``--device cpu``, the default without CUDA): small shapes (2 layers,
hidden 256), the numpy path the probe uses on the CPU vs the torch branch; the
GPU-only methods are left out. It exercises this script's code path; its
numbers say nothing about a GPU. Writes bench/results/mask_pass_cpu.json.

Usage: python bench/bench_mask_pass.py [--device cuda|cpu] [--layers N] [--repeats 5] [--dtypes fp32 bf16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from compass_monitor.bf16 import changed_from_bits
from compass_monitor.bitpack import pack_bits
from compass_monitor.matrix_probe import measure_range as _measure_range
from compass_monitor.matrix_probe import counts_torch

from bench_spectral import cpu_model

ROOT = Path(__file__).resolve().parent.parent
QWEN3_8B = dict(hidden=4096, intermediate=12288, q_heads=32, kv_heads=8, head_dim=128, layers=36)
SMALL = dict(hidden=256, intermediate=768, q_heads=4, kv_heads=2, head_dim=64, layers=2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_shapes(cfg: dict[str, int]) -> list[tuple[str, tuple[int, int]]]:
    """(out, in) of one decoder layer's seven linear matrices."""
    h, i, q, kv = cfg["hidden"], cfg["intermediate"], cfg["q_heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    return [("q", (q, h)), ("k", (kv, h)), ("v", (kv, h)), ("o", (h, q)), ("gate", (i, h)), ("up", (i, h)), ("down", (h, i))]


def make_matrices(shapes: list[tuple[int, int]], device: torch.device, generator: torch.Generator) -> list[SimpleNamespace]:
    """Per matrix: W0 (fp32, bf16-representable), canonical base codes, random packed reference and previous masks."""
    out = []
    for m, n in shapes:
        w0 = (torch.randn(m, n, device=device, generator=generator) * 0.02).to(torch.bfloat16)
        base = w0.view(torch.int16).clone()
        base[(base & 0x7FFF) == 0] = 0  # canonical: no -0
        nbytes = (m * n + 7) // 8
        reference = torch.randint(0, 256, (3, nbytes), device=device, dtype=torch.uint8, generator=generator)
        previous = torch.randint(0, 256, (nbytes,), device=device, dtype=torch.uint8, generator=generator)
        out.append(SimpleNamespace(shape=(m, n), w0=w0, base=base.reshape(-1), reference=reference, previous=previous))
    return out


def current_weights(mats: list[SimpleNamespace], dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    """W0 with about a third of the entries moved by a relative 1e-2 (flat, the probe's 1-D view)."""
    out = []
    for mat in mats:
        w = mat.w0.to(dtype if dtype == torch.float32 else torch.float32)
        noise = torch.randn(w.shape, device=w.device, generator=generator) * 1e-2 * w.abs()
        moved = torch.rand(w.shape, device=w.device, generator=generator) < 0.3
        out.append((w + noise * moved).to(dtype).reshape(-1))
        del w, noise, moved
    return out


def torch_ops(values: torch.Tensor, base: torch.Tensor, reference: torch.Tensor, previous: torch.Tensor, n: int):
    """The probe's torch branch for a whole matrix, as one function (the torch.compile subject)."""
    current = values.to(torch.bfloat16).view(torch.int16) if values.dtype != torch.bfloat16 else values.view(torch.int16)
    changed = changed_from_bits(current, base)
    packed = pack_bits(changed)
    counts = counts_torch(packed, reference, previous, current)
    grid = changed.view(-1, n)
    return counts, grid.sum(dim=1, dtype=torch.int32), grid.sum(dim=0, dtype=torch.int32), packed


def _state(mat: SimpleNamespace, values: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(
        shard=SimpleNamespace(local=lambda: values), start=0, numel=values.numel(), base_bits=mat.base,
        reference_packed=mat.reference, previous_packed=mat.previous,
    )  # fmt: skip


def per_matrix(fn: Callable[[SimpleNamespace, torch.Tensor], Any]) -> Callable[[list, list], list]:
    """A whole pass of a per-matrix method: one call per matrix."""
    return lambda mats, currents: [fn(mat, values) for mat, values in zip(mats, currents)]


def methods(device: torch.device) -> dict[str, Callable[[list, list], list]]:
    """Each method runs one whole pass: ``fn(matrices, currents)`` -> per matrix (counts, rows, cols, packed)."""
    def via_torch(mat, values):
        return _measure_range(_state(mat, values), mat.shape, backend="torch")

    def via_numpy(mat, values):
        return _measure_range(_state(mat, values), mat.shape, backend="numpy")

    if device.type != "cuda":
        return {"numpy": per_matrix(via_numpy), "torch": per_matrix(via_torch)}
    from compass_monitor.kernels import fused_mask_pass, fused_mask_pass_many

    from read_floor import read_inputs_once

    compiled = torch.compile(torch_ops, dynamic=True)
    return {
        "fused": per_matrix(lambda mat, values: fused_mask_pass(values, mat.base, mat.reference, mat.previous, start=0, shape=mat.shape)),
        "fused_group": lambda mats, currents: fused_mask_pass_many(
            [(values, mat.base, mat.reference, mat.previous, 0, mat.shape) for mat, values in zip(mats, currents)]
        ),
        "torch": per_matrix(via_torch),
        "compile": per_matrix(lambda mat, values: compiled(values, mat.base, mat.reference, mat.previous, mat.shape[1])),
        "floor": per_matrix(lambda mat, values: read_inputs_once(values, mat.base, mat.reference, mat.previous)),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pass(fn, mats, currents, device, repeats: int) -> list[float]:
    """Wall seconds of whole passes over every matrix (one synchronisation per pass)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        results = fn(mats, currents)
        sync(device)
        times.append(time.perf_counter() - start)
        del results
    return times


def time_graph_replay(fn, mats, currents, repeats: int) -> list[float]:
    """Seconds of whole passes replayed from one CUDA graph: the device time alone, without the host's launches.

    Eager minus replay is what launching the pass matrix by matrix costs on the host
    (the case for one launch per group of matrices, if it is large).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        fn(mats, currents)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(mats, currents)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del outputs, graph
    return times


def check_equal(fns, mats, currents, count: int = 3) -> None:
    """The methods that produce outputs agree on the first matrices (bit for bit)."""
    names = [k for k in fns if k != "floor"]
    host = lambda t: np.asarray(t.cpu()) if isinstance(t, torch.Tensor) else np.asarray(t)  # noqa: E731
    results = {k: fns[k](mats[:count], currents[:count]) for k in names}
    for j, mat in enumerate(mats[:count]):
        first = [host(t) for t in results[names[0]][j]]
        for k in names[1:]:
            for field, a, b in zip(("counts", "rows", "cols", "packed"), first, results[k][j]):
                if not np.array_equal(a, host(b)):
                    raise AssertionError(f"{k} differs from {names[0]} in {field} on a {mat.shape} matrix")


def no_host_sync(fn, mats, currents) -> bool:
    """Run one pass with CUDA sync debugging set to raise; True if nothing synchronised."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(mats, currents)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return True


def input_bytes(mats, currents) -> int:
    """Bytes a pass must read at least: current weights, base codes, 3 reference masks, previous mask."""
    return sum(v.numel() * v.element_size() + m.base.numel() * 2 + 4 * m.previous.numel() for m, v in zip(mats, currents))


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["device"] = "cpu"
        info["cpu"] = cpu_model()
        info["torch_threads"] = torch.get_num_threads()
    return info


def default_out(device: torch.device) -> Path:
    if device.type == "cuda":
        name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        return ROOT / "bench" / "results" / f"mask_pass_{name}.json"
    return ROOT / "bench" / "results" / "mask_pass_cpu.json"


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cfg = dict(QWEN3_8B if device.type == "cuda" else SMALL)
    if args.layers:
        cfg["layers"] = args.layers
    shapes = [shape for _ in range(cfg["layers"]) for _, shape in layer_shapes(cfg)]
    generator = torch.Generator(device=device).manual_seed(0)
    mats = make_matrices(shapes, device, generator)
    fns = methods(device)  # a copy per dtype below: a method that fails for one dtype may run for the other
    report: dict[str, Any] = {
        "benchmark": "mask pass per snapshot: " + ", ".join(fns),
        "machine": machine(device),
        "model": f"{cfg['layers']} layers x q,k,v,o,gate,up,down (hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, "
        f"{cfg['q_heads']} q heads, {cfg['kv_heads']} kv heads, head_dim {cfg['head_dim']})",
        "matrices": len(shapes),
        "weights": sum(m * n for m, n in shapes),
        "repeats": args.repeats,
        "by_dtype": {},
    }
    all_methods = fns
    for dtype_name in args.dtypes:
        fns = dict(all_methods)
        currents = current_weights(mats, DTYPES[dtype_name], generator)
        result: dict[str, Any] = {"input_bytes": input_bytes(mats, currents), "methods": {}, "failed": {}}
        for name, fn in list(fns.items()):  # warm-up: triton / inductor compilation, allocator
            try:
                time_pass(fn, mats, currents, device, 1)
            except Exception as exc:  # a method that cannot run here is reported, the others still measured
                result["failed"][name] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"{dtype_name} {name} failed: {result['failed'][name][:300]}", flush=True)
                del fns[name]
        check_equal(fns, mats, currents)
        nbytes = result["input_bytes"]
        for name, fn in fns.items():
            times = time_pass(fn, mats, currents, device, args.repeats)
            median = statistics.median(times)
            result["methods"][name] = {"median_s": median, "min_s": min(times), "times_s": times, "input_gb_per_s": nbytes / median / 1e9}
            print(f"{dtype_name} {name}: {median * 1e3:.2f} ms ({nbytes / median / 1e9:.2f} GB/s of inputs)", flush=True)
        for name in ("fused", "fused_group", "floor") if device.type == "cuda" else ():
            if name not in fns:
                continue
            try:
                times = time_graph_replay(fns[name], mats, currents, args.repeats)
            except Exception as exc:  # capture can fail on some set-ups: reported, not fatal
                result["failed"][f"{name}_graph"] = f"{type(exc).__name__}: {exc}"[:2000]
                continue
            median = statistics.median(times)
            result["methods"][f"{name}_graph"] = {"median_s": median, "min_s": min(times), "times_s": times, "input_gb_per_s": nbytes / median / 1e9}
            print(f"{dtype_name} {name} (CUDA graph replay): {median * 1e3:.2f} ms ({nbytes / median / 1e9:.2f} GB/s)", flush=True)
        base = result["methods"]
        reference = "floor" if "floor" in base else next(iter(base))
        result["ratio_to_" + reference] = {k: v["median_s"] / base[reference]["median_s"] for k, v in base.items()}
        if device.type == "cuda" and "fused" in base and "floor" in base:
            result["fused_no_host_sync"] = no_host_sync(fns["fused"], mats, currents)
            if "fused_group" in base:
                result["fused_group_no_host_sync"] = no_host_sync(fns["fused_group"], mats, currents)
            result["goal_met"] = min(result["ratio_to_floor"].get(k, float("inf")) for k in ("fused", "fused_group")) <= 1.5
        report["by_dtype"][dtype_name] = result
        del currents
    report["goal"] = "fused <= 1.5x floor (reading the inputs once), on the GPU" if device.type == "cuda" else "none: the CPU run exercises the code path"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 36 on cuda, 2 on cpu)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args)
    out = args.out or default_out(torch.device(args.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
