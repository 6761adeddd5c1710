"""The demo's progress lines: one per GRPO step, and a "still working" line whenever nothing was said for a while.

A loaded two-core machine can take minutes to load the model or to evaluate the
base policy; a line at least every ``every`` seconds (default 5) shows that the
demo is alive and what it is doing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Prints ``demo: ...`` lines to ``stream``; use as a context manager (a daemon thread speaks up when quiet).

    Args:
        total_steps: GRPO steps of the run (for ``step 3/30``).
        every: seconds of silence after which a line with the current phase and elapsed time is printed.
        stream: where lines go (stdout by default; the live demo's child writes to its log file).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, *, total_steps: int, every: float = 5.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every <= 0:
            raise ValueError(f"Progress: every must be > 0 seconds, got {every}")
        self.total_steps = total_steps
        self.every = every
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.started = clock()
        self.current = "starting"
        self._last = self.started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def say(self, text: str) -> None:
        """Print one ``demo: `` line now."""
        with self._lock:
            self._last = self.clock()
            print(f"demo: {text}", file=self.stream, flush=True)

    def phase(self, text: str) -> None:
        """Enter a phase (``loading the model``, ``training``...) and say so."""
        self.current = text
        self.say(f"{text}... ({self.clock() - self.started:.0f}s)")

    def step(self, step: int, metrics: dict[str, float], sparsity: float | None) -> None:
        """The line of one finished GRPO step: reward, and the latest snapshot's global update sparsity."""
        self.current = f"training, step {step}/{self.total_steps} done"
        spars = "no snapshot yet" if sparsity is None else f"latest snapshot sparsity {sparsity:.4f}"
        acc = f", eval accuracy {metrics['eval_accuracy']:.3f}" if "eval_accuracy" in metrics else ""
        self.say(f"step {step}/{self.total_steps}: reward {metrics['reward']:.3f}{acc}, {spars} ({self.clock() - self.started:.0f}s)")

    def tick(self) -> None:
        """Say the current phase if nothing was printed for ``every`` seconds (the thread calls this)."""
        if self.clock() - self._last >= self.every:
            self.say(f"{self.current}... ({self.clock() - self.started:.0f}s)")

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 4)):
            self.tick()

    def __enter__(self) -> "Progress":
        self._thread = threading.Thread(target=self._run, name="compass-demo-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
