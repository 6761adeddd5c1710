"""Spectral diagnostics: our spectral_drift (base precomputed) vs an fp32 SVD baseline.

Measures, on LLM-shaped matrices, the time of ``spectral_drift`` (both methods;
the base decomposition is computed once beforehand, as the monitor does) and of
the obvious fp32 baseline, and records accuracy against the float64
numpy/scipy reference beside the speed, for ours and for the baseline.

Baseline (fp32, torch): ``svdvals(W0) + svdvals(Wt)`` for NSS and
``svd(W0) + svd(Wt)`` for the subspaces ("naive", what an offline checkpoint
diff does), and ``svd(Wt)`` alone ("cached": the base's fp32 SVD kept, values
taken from the same SVD; the most favourable baseline).

Matrices are synthetic but shaped and conditioned like LLM weights: a
Marchenko-Pastur-like bulk with a power-law column scaling plus a few strong
spikes, rounded to bf16 (square ones have near-zero singular values, like real
attention weights). The timed update is RL-sized, ``Wt = bf16(W0 + dW)`` with
``||dW||_F = 1e-3 ||W0||_F`` (NSS ~1e-5, as the paper reports for RL
checkpoints); accuracy is also checked at 1e-4 and at SFT-sized 1e-2.

CPU (default): Qwen2-1.5B shapes (hidden 1536; q/o 1536x1536, k/v 256x1536,
gate/up 8960x1536, down 1536x8960), ``--layers 1`` (7 of the 196 matrices);
about 10 minutes on 2 busy cores, most of it the float64 reference and the
fp32 baseline. Writes bench/results/spectral_cpu.json. Use ``--threads 1`` on
a shared machine (two spinning BLAS threads slow everything down there).

GPU: ``--device cuda --shapes qwen3-8b`` times all 36 layers (252 matrices:
q/o 4096x4096, k/v 1024x4096, gate/up 12288x4096, down 4096x12288), the
baseline on layer 0 only (extrapolated x36, said so in the JSON) and the
float64 reference on a few matrices (``--reference q,k``); writes
bench/results/spectral_<gpu-name>.json. See bench/gpu_spectral.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import math
import os
import platform
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("exact", "perturb", "auto", "checked")
ACCURACY_ROWS = ("exact", "perturb", "checked", "baseline_fp32")

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {  # a smoke test of this script, seconds on any machine
        "layers": 2,
        "matrices": {
            "q": (96, 96),
            "k": (32, 96),
            "v": (32, 96),
            "o": (96, 96),
            "gate": (224, 96),
            "up": (224, 96),
            "down": (96, 224),
        },
    },
    "qwen2-1.5b": {
        "layers": 28,
        "matrices": {
            "q": (1536, 1536),
            "k": (256, 1536),
            "v": (256, 1536),
            "o": (1536, 1536),
            "gate": (8960, 1536),
            "up": (8960, 1536),
            "down": (1536, 8960),
        },
    },
    "qwen3-8b": {
        "layers": 36,
        "matrices": {
            "q": (4096, 4096),
            "k": (1024, 4096),
            "v": (1024, 4096),
            "o": (4096, 4096),
            "gate": (12288, 4096),
            "up": (12288, 4096),
            "down": (4096, 12288),
        },
    },
}


def import_spectral() -> tuple[types.ModuleType, Callable[..., dict]]:
    """Import compass_monitor.spectral; on a bare GPU box (no zarr etc.) skip the package __init__."""
    sys.path.insert(0, str(ROOT))
    try:
        spectral = importlib.import_module("compass_monitor.spectral")
    except ImportError:
        for name in [m for m in sys.modules if m == "compass_monitor" or m.startswith("compass_monitor.")]:
            del sys.modules[name]
        package = types.ModuleType("compass_monitor")
        package.__path__ = [str(ROOT / "compass_monitor")]
        sys.modules["compass_monitor"] = package
        spectral = importlib.import_module("compass_monitor.spectral")
    reference = importlib.import_module("compass_monitor.spectral_reference")
    return spectral, reference.spectral_drift_reference


# ----------------------------------------------------------------------------
# data


def synth_weight(m: int, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """bf16 matrix with an MP-like bulk, power-law column scales and 8 spikes."""
    bulk = torch.randn(m, n, generator=gen, device=device) / math.sqrt(n)
    scale = (1.0 + torch.arange(n, device=device, dtype=torch.float32)) ** -0.25
    bulk *= scale[torch.randperm(n, generator=gen, device=device)]
    r = 8
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, device=device)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, device=device)).Q
    edge = float(scale.square().mean().sqrt()) * (1 + math.sqrt(min(m, n) / max(m, n)))
    spikes = edge * torch.tensor([6.0, 4.0, 3.0, 2.5, 2.0, 1.8, 1.6, 1.4], device=device)
    return (0.02 * (bulk + (u * spikes) @ v.T)).to(torch.bfloat16)


def drifted(w0: torch.Tensor, drift: float, gen: torch.Generator) -> torch.Tensor:
    w = w0.float()
    dw = torch.randn(w.shape, generator=gen, device=w.device) * (drift * float(w.norm()) / math.sqrt(w.numel()))
    return (w + dw).to(torch.bfloat16)


# ----------------------------------------------------------------------------
# timing and accuracy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def baseline_fp32(w0: torch.Tensor, wt: torch.Tensor, device: torch.device, repeats: int = 1) -> dict[str, Any]:
    """The fp32 torch baseline, timed piece by piece (best of ``repeats``), with its results."""
    a0, at = w0.float(), wt.float()
    t_sv0, s0 = timed(lambda: torch.linalg.svdvals(a0), device, repeats)
    t_svt, st = timed(lambda: torch.linalg.svdvals(at), device, repeats)
    t_svd0, svd0 = timed(lambda: torch.linalg.svd(a0, full_matrices=False), device, repeats)
    t_svdt, svdt = timed(lambda: torch.linalg.svd(at, full_matrices=False), device, repeats)
    return {
        "naive_s": t_sv0 + t_svt + t_svd0 + t_svdt,
        "cached_s": t_svdt,
        "s0": s0.double().cpu().numpy(),
        "st": st.double().cpu().numpy(),
        "u0": svd0.U.double().cpu().numpy(),
        "v0": svd0.Vh.mT.double().cpu().numpy(),
        "ut": svdt.U.double().cpu().numpy(),
        "vt": svdt.Vh.mT.double().cpu().numpy(),
    }


def baseline_metrics(base: dict[str, Any], k: int) -> dict[str, Any]:
    import scipy.linalg

    k = min(k, base["s0"].shape[0])
    left = np.degrees(scipy.linalg.subspace_angles(base["u0"][:, :k], base["ut"][:, :k]))
    right = np.degrees(scipy.linalg.subspace_angles(base["v0"][:, :k], base["vt"][:, :k]))
    s0, st = base["s0"], base["st"]
    return {
        "nss": float(np.linalg.norm(st - s0) / np.linalg.norm(s0)),
        "angles_left_deg": np.sort(left)[::-1],
        "angles_right_deg": np.sort(right)[::-1],
        "topk_energy_rel_change": float((st[:k].sum() - s0[:k].sum()) / s0[:k].sum()),
    }


def errors(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    nss_ref = ref["nss"]
    energy_ref = ref["topk_energy_rel_change"]
    return {
        "nss": float(got["nss"]),
        "nss_rel_err": abs(float(got["nss"]) - nss_ref) / nss_ref if nss_ref > 0 else abs(float(got["nss"])),
        "max_angle_err_deg": float(
            max(
                np.max(np.abs(np.asarray(got["angles_left_deg"]) - ref["angles_left_deg"])),
                np.max(np.abs(np.asarray(got["angles_right_deg"]) - ref["angles_right_deg"])),
            )
        ),
        "energy_rel_err": abs(float(got["topk_energy_rel_change"]) - energy_ref) / max(abs(energy_ref), 1e-300),
        **{
            short: got[key]
            for short, key in (
                ("nonperturbative", "nss_nonperturbative_fraction"),
                ("angle_error_bound_deg", "angle_error_bound_deg"),
            )
            if key in got
        },
    }


def reference_block(ref: dict[str, Any]) -> dict[str, float]:
    return {
        "nss": ref["nss"],
        "max_angle_left_deg": ref["max_angle_left_deg"],
        "max_angle_right_deg": ref["max_angle_right_deg"],
        "topk_energy_rel_change": ref["topk_energy_rel_change"],
    }


# ----------------------------------------------------------------------------
# machine info


def machine_info(device: torch.device) -> dict[str, Any]:
    import scipy

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": cpu_model(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def default_out(device: torch.device) -> Path:
    if device.type == "cuda":
        name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        return ROOT / "bench" / "results" / f"spectral_{name}.json"
    return ROOT / "bench" / "results" / "spectral_cpu.json"


# ----------------------------------------------------------------------------
# main loop


def run(args: argparse.Namespace) -> dict[str, Any]:
    spectral, reference = import_spectral()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SHAPES[args.shapes]
    layers = args.layers or spec["layers"]
    baseline_layers = spec["layers"] if args.baseline_layers is None else args.baseline_layers
    names = list(spec["matrices"])
    ref_names = names if args.reference == "all" else [x for x in args.reference.split(",") if x]
    accuracy_drifts = [args.drift, *[d for d in args.accuracy_drifts if d != args.drift]]
    config = spectral.SpectralConfig(k=args.k, method="perturb")  # a perturb base serves both methods
    auto = spectral.SpectralConfig(k=args.k)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    info = machine_info(device)
    print(f"device {info['device_name']}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)

    warm = synth_weight(64, 48, gen, device)
    spectral.spectral_drift(spectral.spectral_base(warm, config), warm)
    torch.linalg.svd(warm.float())

    records: list[dict[str, Any]] = []
    for layer in range(layers):
        for name in names:
            m, n = spec["matrices"][name]
            w0 = synth_weight(m, n, gen, device)
            wt = drifted(w0, args.drift, gen)
            t_base, base = timed(lambda: spectral.spectral_base(w0, config), device, 1)
            rec: dict[str, Any] = {
                "layer": layer,
                "name": name,
                "shape": [m, n],
                "auto_method": auto.resolve_method(device, (m, n)),
                "base_s": t_base,
                "base_bytes": {"exact": _exact_bytes(base), "perturb": base.nbytes},
                "drift_s": {},
            }
            results = {}
            for method in ("exact", "perturb"):
                rec["drift_s"][method], results[method] = timed(
                    lambda: spectral.spectral_drift(base, wt, method=method), device, args.repeats
                )
            rec["drift_s"]["auto"] = rec["drift_s"][rec["auto_method"]]
            rec["nonperturbative"] = float(results["perturb"].nss_nonperturbative_fraction)
            # spectral_drift_checked: perturb, redone exactly where perturb flags itself
            flagged = rec["nonperturbative"] > args.max_nonperturbative
            rec["drift_s"]["checked"] = rec["drift_s"]["perturb"] + (rec["drift_s"]["exact"] if flagged else 0.0)
            if layer < baseline_layers:
                bl = baseline_fp32(w0, wt, device, args.repeats)
                rec["baseline_naive_s"], rec["baseline_cached_s"] = bl["naive_s"], bl["cached_s"]
                if layer == 0 and name in ref_names:
                    rec["accuracy"] = accuracy(spectral, reference, base, w0, wt, bl, accuracy_drifts, gen, args, device)
            records.append(rec)
            print(line(rec), flush=True)
            del w0, wt, base, results
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        info["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    return {
        "benchmark": "spectral",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": info,
        "settings": {
            "shapes": args.shapes,
            "layers_timed": layers,
            "layers_in_model": spec["layers"],
            "baseline_layers": min(baseline_layers, layers),
            "reference_matrices": ref_names,
            "k": args.k,
            "drift": args.drift,
            "accuracy_drifts": accuracy_drifts,
            "repeats": args.repeats,
            "seed": args.seed,
            "ritz_iters": config.ritz_iters,
            "max_nonperturbative": args.max_nonperturbative,
            "oversample": config.oversample,
        },
        "matrices": records,
        "summary": summarize(records, spec["layers"], layers),
    }


def _exact_bytes(base: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (base.lam0, base.sigma0, base.u0k, base.v0p))


def accuracy(spectral, reference, base, w0, wt, bl, drifts, gen, args, device) -> list[dict[str, Any]]:
    """Ours (both methods) and the fp32 baseline against the float64 reference."""
    with _blas_threads(args.threads):
        return _accuracy(spectral, reference, base, w0, wt, bl, drifts, gen, args, device)


def _blas_threads(threads: int) -> Any:
    """numpy/scipy's BLAS threads for the reference (threadpoolctl, if installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(threads) if threads else contextlib.nullcontext()


def _accuracy(spectral, reference, base, w0, wt, bl, drifts, gen, args, device) -> list[dict[str, Any]]:
    out = []
    w0_np = w0.double().cpu().numpy()
    for drift in drifts:
        if drift != args.drift:
            wt = drifted(w0, drift, gen)
            bl = {**bl, **{key: val for key, val in baseline_fp32(w0, wt, device).items() if key in ("st", "ut", "vt")}}
        ref = reference(w0_np, wt.double().cpu().numpy(), args.k)
        entry: dict[str, Any] = {"drift": drift, "reference": reference_block(ref)}
        for method in ("exact", "perturb"):
            got = spectral.spectral_drift(base, wt, method=method).to_dict()
            entry[method] = errors(got, ref)
        flagged = entry["perturb"]["nonperturbative"] > args.max_nonperturbative
        entry["checked"] = {**entry["exact" if flagged else "perturb"], "used": "exact" if flagged else "perturb"}
        entry["baseline_fp32"] = errors(baseline_metrics(bl, args.k), ref)
        out.append(entry)
    return out


def line(rec: dict[str, Any]) -> str:
    m, n = rec["shape"]
    text = (
        f"L{rec['layer']:02d} {rec['name']:4s} {m:5d}x{n:<5d} base {rec['base_s']:6.2f}s "
        f"exact {rec['drift_s']['exact']:6.3f}s perturb {rec['drift_s']['perturb']:6.3f}s "
        f"(auto={rec['auto_method']})"
    )
    if "baseline_naive_s" in rec:
        text += f" | fp32 naive {rec['baseline_naive_s']:6.2f}s cached {rec['baseline_cached_s']:6.2f}s"
    for acc in rec.get("accuracy", []):
        text += (
            f"\n      drift {acc['drift']:.0e}: NSS_ref {acc['reference']['nss']:.3e} "
            f"max angle_ref {max(acc['reference']['max_angle_left_deg'], acc['reference']['max_angle_right_deg']):.3e} deg; "
            + "; ".join(
                f"{who} NSS err {acc[who]['nss_rel_err']:.1e} angle err {acc[who]['max_angle_err_deg']:.1e} deg"
                for who in ("exact", "perturb", "baseline_fp32")
            )
        )
    return text


def summarize(records: list[dict[str, Any]], layers_in_model: int, layers_timed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"matrices_timed": len(records)}
    for method in METHODS:
        out[f"total_drift_s_{method}"] = sum(r["drift_s"][method] for r in records)
    out["total_base_s"] = sum(r["base_s"] for r in records)
    out["base_bytes_total"] = {
        meth: sum(r["base_bytes"][meth] for r in records) for meth in ("exact", "perturb")
    }
    scale = layers_in_model / layers_timed
    out["whole_model_drift_s_estimate"] = {
        meth: out[f"total_drift_s_{meth}"] * scale for meth in METHODS
    }
    with_baseline = [r for r in records if "baseline_naive_s" in r]
    if with_baseline:
        naive = sum(r["baseline_naive_s"] for r in with_baseline)
        cached = sum(r["baseline_cached_s"] for r in with_baseline)
        out["baseline_subset"] = {
            "matrices": len(with_baseline),
            "baseline_naive_s": naive,
            "baseline_cached_s": cached,
            **{f"ours_{meth}_s": sum(r["drift_s"][meth] for r in with_baseline) for meth in METHODS},
        }
        sub = out["baseline_subset"]
        out["speedup_vs_fp32_naive"] = {meth: naive / sub[f"ours_{meth}_s"] for meth in METHODS}
        out["speedup_vs_fp32_cached"] = {meth: cached / sub[f"ours_{meth}_s"] for meth in METHODS}
        if len(with_baseline) < len(records):
            out["baseline_whole_model_estimate_s"] = {
                "naive": naive * layers_in_model / len({r["layer"] for r in with_baseline}),
                "cached": cached * layers_in_model / len({r["layer"] for r in with_baseline}),
                "note": "baseline timed on the first layer(s) only and scaled by the layer count",
            }
    acc = [a for r in records for a in r.get("accuracy", [])]
    if acc:
        out["accuracy_worst"] = {}
        for who in ACCURACY_ROWS:
            out["accuracy_worst"][who] = {
                "nss_rel_err_max_where_nss_ge_1e-6": max(
                    (a[who]["nss_rel_err"] for a in acc if a["reference"]["nss"] >= 1e-6), default=None
                ),
                "max_angle_err_deg": max(a[who]["max_angle_err_deg"] for a in acc),
                "energy_rel_err_max": max(a[who]["energy_rel_err"] for a in acc),
            }
        out["accuracy_by_drift"] = {
            f"{d:.0e}": {
                who: {
                    "nss_rel_err_max": max(a[who]["nss_rel_err"] for a in acc if a["drift"] == d),
                    "max_angle_err_deg": max(a[who]["max_angle_err_deg"] for a in acc if a["drift"] == d),
                }
                for who in ACCURACY_ROWS
            }
            for d in sorted({a["drift"] for a in acc})
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="default: qwen2-1.5b on cpu, qwen3-8b on cuda")
    parser.add_argument("--layers", type=int, default=None, help="layers to time (default: 1 on cpu, all on cuda)")
    parser.add_argument("--baseline-layers", type=int, default=None, help="layers that also run the fp32 baseline (default: 1)")
    parser.add_argument("--reference", default=None, help="layer-0 matrices checked against float64 ('all' or e.g. 'q,k')")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--drift", type=float, default=1e-3, help="relative ||dW||_F of the timed update (RL-sized)")
    parser.add_argument(
        "--accuracy-drifts",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=None,
        help="drifts checked against float64 (default: 1e-4,1e-3,1e-2 on cpu; 1e-3,1e-2 on cuda)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (ours and baseline), min taken (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch (and reference BLAS) CPU threads; 0: defaults")
    parser.add_argument("--max-nonperturbative", type=float, default=0.1, help="threshold of spectral_drift_checked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shapes = args.shapes or ("qwen3-8b" if cuda else "qwen2-1.5b")
    args.layers = args.layers if args.layers is not None else (None if cuda else 1)
    args.baseline_layers = 1 if args.baseline_layers is None else args.baseline_layers
    args.reference = args.reference or ("q,k" if cuda else "all")
    args.repeats = args.repeats or 2
    args.accuracy_drifts = args.accuracy_drifts or ([1e-3, 1e-2] if cuda else [1e-4, 1e-3, 1e-2])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = args.out or default_out(torch.device(args.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    summary = result["summary"]
    print(json.dumps(summary, indent=1, default=_json_default))
    print(f"wrote {out}")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
