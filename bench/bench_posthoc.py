"""Post hoc (``compass-monitor diff``) on a Qwen2-1.5B-shaped checkpoint pair vs the I/O floor and a check_sparsity-style baseline.

The pair: synthetic bf16 weights with Qwen2-1.5B shapes (hidden 1536,
intermediate 8960, 12 query / 2 key-value heads of 128, vocabulary 151936,
tied embeddings), ``--layers`` decoder layers (28 in the real model; fewer
when disk or time is short, stated in the results), one safetensors shard per
layer plus one for the embeddings, with ``model.safetensors.index.json``. The
checkpoint is ``bf16(W0 + 4e-5 * N(0, 1))``: every weight moves a little, and
whether its bf16 code changes depends on its magnitude, as in a real RL run.

Each method runs in its own subprocess (peak RSS is ``ru_maxrss`` of that
process) with both files evicted from the page cache first
(``posix_fadvise(DONTNEED)``), side by side in one run:

* ``io_floor``: read both checkpoints' files once (raw reads, 16 MiB blocks);
* ``ours``: ``diff_checkpoints`` (monitor over the lazily read checkpoint):
  ``base`` = base capture (reads W0, principal and low masks, precision-null
  classes, store base), ``snapshot`` = the mask pass of the checkpoint (reads
  it, changed masks, counts, profiles, store commit);
* ``reference_masks``: the principal and low-magnitude masks of every base
  matrix alone (the costly part of the base capture), timed separately;
* ``spectral`` (``--spectral``): the same diff with the spectral diagnostics on;
* ``baseline``: ``sparsity_in_rl``'s ``check_sparsity.py`` method: both models
  loaded whole (``safetensors.torch.load_file``), per tensor ``delta = rl - sft``
  in bf16 and ``torch.isclose(delta, 0, atol=1e-5)`` counted as unchanged.
  After timing it also counts, per tensor, the weights its tolerance
  classifies differently from the exact bf16 comparison (Def. 2.1).

Usage: python bench/bench_posthoc.py [--layers 4] [--device cpu|cuda] [--spectral] [--workdir DIR]
Writes bench/results/posthoc_<device>.json.
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

HIDDEN, INTERMEDIATE, KV, VOCAB = 1536, 8960, 256, 151936
RESULTS = Path(__file__).resolve().parent / "results"


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
        p + "self_attn.k_proj.weight": (KV, HIDDEN), p + "self_attn.k_proj.bias": (KV,),
        p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.v_proj.bias": (KV,),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
    }


def write_pair(root: Path, layers: int, seed: int = 0) -> None:
    """Base and checkpoint folders, one shard per layer, generated shard by shard (bounded memory)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    groups = [{"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}] + [layer_shapes(i) for i in range(layers)]
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
              "num_hidden_layers": layers, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": VOCAB,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    for folder in ("base", "checkpoint-100"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for g, shapes in enumerate(groups):
        name = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        base, ckpt = {}, {}
        for tensor, shape in shapes.items():
            w0 = torch.randn(shape, generator=gen) * (1.0 if tensor.endswith("norm.weight") else 0.02)
            base[tensor] = w0.to(torch.bfloat16)
            ckpt[tensor] = (base[tensor].float() + 4e-5 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            weight_map[tensor] = name
        save_file(base, root / "base" / name, metadata={"format": "pt"})
        save_file(ckpt, root / "checkpoint-100" / name, metadata={"format": "pt"})
    index = json.dumps({"metadata": {}, "weight_map": weight_map})
    for folder in ("base", "checkpoint-100"):
        (root / folder / "model.safetensors.index.json").write_text(index)


def evict(root: Path) -> None:
    for path in root.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM: reset by exec, unlike ru_maxrss, which keeps the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- methods, each run in its own process -------------------------------------------------------------------------


def m_io_floor(root: Path, args) -> dict:
    t0 = time.perf_counter()
    total = 0
    for folder in ("base", "checkpoint-100"):
        for path in sorted((root / folder).glob("*.safetensors")):
            with open(path, "rb", buffering=0) as f:
                while block := f.read(16 << 20):
                    total += len(block)
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def _config(args, spectral: bool):
    from compass_monitor import MonitorConfig

    return MonitorConfig(principal_rank=64, snapshot_on_close=False, spectral_every=1 if spectral else 0, spectral_k=64)


def m_ours(root: Path, args, spectral: bool = False) -> dict:
    from compass_monitor.checkpoints import diff_checkpoints, resolve_steps

    out = root / ("run-spectral" if spectral else "run")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = diff_checkpoints(root / "base", resolve_steps([root / "checkpoint-100"]), out, config=_config(args, spectral), progress=False, device=args.device)
    total = time.perf_counter() - t0
    from compass_monitor.store import open_run

    run = open_run(out)
    changed = {p.name: int(run.counts[0, p.index, 0]) for p in run.params}
    return {"seconds": total, "base": result.seconds["base"], "snapshot": result.seconds["step 100"], "changed": changed,
            "monitored_weights": sum(s.numel for s in result.specs)}


def m_spectral(root: Path, args) -> dict:
    return m_ours(root, args, spectral=True)


def m_reference_masks(root: Path, args) -> dict:
    import torch

    from compass_monitor.checkpoints import open_checkpoint
    from compass_monitor.principal import principal_mask
    from compass_monitor.exact_selection import select_count, top_count_mask

    def low_magnitude_mask(w0, alpha):  # as the probe selects it: top of -|W0|, exact count
        return top_count_mask(-w0.abs(), select_count(w0.numel(), alpha))

    source = open_checkpoint(root / "base")
    names = [n for n in source.names() if n.endswith("proj.weight")]
    loads = principal = low = 0.0
    for name in names:
        t = time.perf_counter()
        w0 = source.load(name).to(args.device).float()
        loads += time.perf_counter() - t
        t = time.perf_counter()
        principal_mask(w0, 64, 0.5)
        if w0.is_cuda:
            torch.cuda.synchronize()
        principal += time.perf_counter() - t
        t = time.perf_counter()
        low_magnitude_mask(w0, 0.5)
        if w0.is_cuda:
            torch.cuda.synchronize()
        low += time.perf_counter() - t
    return {"seconds": principal + low, "principal": principal, "low": low, "read": loads}


def m_baseline(root: Path, args) -> dict:
    import torch
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    sft, rl = {}, {}
    for path in sorted((root / "base").glob("*.safetensors")):
        sft.update(load_file(path))
    for path in sorted((root / "checkpoint-100").glob("*.safetensors")):
        rl.update(load_file(path))
    close = {}
    with torch.no_grad():
        for name, w in sft.items():
            delta = rl[name] - w
            close[name] = int(torch.isclose(delta, torch.zeros_like(delta), atol=1e-5).sum())
    seconds = time.perf_counter() - t0
    # Untimed: how the tolerance classifies against the exact bf16 comparison (+0 == -0; no NaN here).
    wrong_unchanged, wrong_changed, exact_changed = {}, {}, {}
    for name, w in sft.items():
        a, b = w.view(torch.int16), rl[name].view(torch.int16)
        exact = (a != b) & (((a | b) & 0x7FFF) != 0)
        tol_changed = ~torch.isclose(rl[name] - w, torch.zeros_like(w), atol=1e-5)
        wrong_unchanged[name] = int((exact & ~tol_changed).sum())
        wrong_changed[name] = int((~exact & tol_changed).sum())
        exact_changed[name] = int(exact.sum())
    return {"seconds": seconds, "tolerance_changed": {n: w.numel() - close[n] for n, w in sft.items()},
            "exact_changed": exact_changed, "missed_changes": wrong_unchanged, "false_changes": wrong_changed}


METHODS = {"io_floor": m_io_floor, "ours": m_ours, "reference_masks": m_reference_masks, "spectral": m_spectral, "baseline": m_baseline}


def run_method(name: str, root: Path, args) -> dict:
    evict(root)
    cmd = [sys.executable, __file__, "--_method", name, "--workdir", str(root), "--device", args.device, "--layers", str(args.layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"method {name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name:>16}: {result['seconds']:8.2f} s, peak RSS {result['peak_rss'] / 2**20:8.0f} MiB", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--spectral", action="store_true", help="also time the diff with the spectral diagnostics")
    parser.add_argument("--workdir", default=None, help="where the pair is written (default: a temporary folder, removed)")
    parser.add_argument("--_method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._method:
        result = METHODS[args._method](Path(args.workdir), args)
        result["peak_rss"] = _peak_rss()
        print(json.dumps(result))
        return

    import torch

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_posthoc_"))
    try:
        t0 = time.perf_counter()
        if not (root / "checkpoint-100" / "model.safetensors.index.json").is_file():
            write_pair(root, args.layers)
        print(f"pair written in {time.perf_counter() - t0:.0f}s under {root}", file=sys.stderr)
        file_bytes = sum(p.stat().st_size for p in (root / "base").glob("*.safetensors"))
        names = ["io_floor", "ours", "reference_masks", "baseline"] + (["spectral"] if args.spectral else [])
        results = {name: run_method(name, root, args) for name in names}
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    ours, base, floor = results["ours"], results["baseline"], results["io_floor"]
    mask_pass = ours["seconds"] - results["reference_masks"]["seconds"]
    exact_total = sum(base["exact_changed"].values())
    linear = [n for n in ours["changed"]]
    report = {
        "benchmark": "compass-monitor diff (post hoc) vs I/O floor and check_sparsity-style tolerance baseline",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda?",
                    "torch": torch.__version__, "load_average_1m": os.getloadavg()[0]},
        "model": f"Qwen2-1.5B-shaped, {args.layers} of 28 decoder layers + embeddings (tied), bf16, synthetic weights, one shard per layer with index",
        "checkpoint_file_bytes": file_bytes,
        "monitored_bytes_per_checkpoint": 2 * ours["monitored_weights"],
        "monitored_weights": ours["monitored_weights"],
        "seconds": {
            "io_floor_both_files": floor["seconds"],
            "ours_total": ours["seconds"],
            "ours_base_capture": ours["base"],
            "ours_snapshot_mask_pass": ours["snapshot"],
            "reference_masks_principal": results["reference_masks"]["principal"],
            "reference_masks_low": results["reference_masks"]["low"],
            "ours_total_minus_reference_masks": mask_pass,
            "baseline_tolerance": base["seconds"],
            **({"spectral_total": results["spectral"]["seconds"], "spectral_base_capture": results["spectral"]["base"],
                "spectral_snapshot": results["spectral"]["snapshot"]} if args.spectral else {}),
        },
        "ratios": {
            "ours_snapshot_mask_pass_vs_io_floor": ours["snapshot"] / floor["seconds"],
            "ours_total_minus_reference_masks_vs_io_floor": mask_pass / floor["seconds"],
            "ours_total_vs_io_floor": ours["seconds"] / floor["seconds"],
            "baseline_vs_io_floor": base["seconds"] / floor["seconds"],
            "ours_total_vs_baseline": ours["seconds"] / base["seconds"],
            "peak_rss_ours_vs_baseline": ours["peak_rss"] / base["peak_rss"],
            "peak_rss_ours_vs_one_checkpoint": ours["peak_rss"] / file_bytes,
        },
        "peak_rss_bytes": {name: r["peak_rss"] for name, r in results.items()},
        "tolerance_method": {
            "exact_changed": exact_total,
            "tolerance_changed": sum(base["tolerance_changed"].values()),
            "missed_changes": sum(base["missed_changes"].values()),
            "false_changes": sum(base["false_changes"].values()),
            "ours_equals_exact_on_monitored": all(ours["changed"][n] == base["exact_changed"][n] for n in linear),
        },
        "note": "one run, each method in its own process with the files evicted from the page cache first; a shared machine: read the ratios",
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"posthoc_{args.device}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
