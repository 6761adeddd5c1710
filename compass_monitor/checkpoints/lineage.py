"""Is the base the checkpoints' base? A closeness test on the weights, before anything is written.

The count of changed bf16 weights cannot tell: an Adam fine-tune at a usual
learning rate changes the bf16 code of nearly every weight within a few steps
(a tiny GPT-2 at lr 1e-3 changes 99.99% of them in two steps), exactly as two
unrelated models do. What does tell is *how far* the weights moved. A
fine-tune (SFT, RL, LoRA merged) stays close to its base; two independently
trained or initialised models are unrelated, their weight matrices nearly
orthogonal as vectors. The test:

* for a sample of the monitored 2-D matrices (``SAMPLE`` tensors spread
  evenly over the model, norms and biases excluded: their unrelated values
  are all near 1 or 0 and look alike), the cosine
  ``<W0, W> / (|W0| |W|)`` of the stored tensors (float64, in chunks);
  a tensor that is zero on either side is skipped;
* the checkpoint is refused when the **median cosine is below**
  :data:`MIN_COSINE` (0.5). A fine-tune is near 1 (the relative change
  ``|W - W0| / |W0|`` of real fine-tunes is 1e-3 .. 1e-1, cosine >= 0.99);
  unrelated zero-mean weights are near 0 (``|cos| ~ 1/sqrt(numel)``).

Every checkpoint of a series is tested against the base before the run store
is created. The refusal names the base, the checkpoint and the cosine, and says
what to do; ``allow_unrelated_base`` (``--allow-unrelated-base``) skips the
test for a user who means to compare two unrelated models.
"""

from __future__ import annotations

import logging
import math
import statistics

import torch

from .errors import CheckpointMismatchError
from .series import TensorSource
from .views import ViewPlan

__all__ = ["BaseMismatchError", "MIN_COSINE", "SAMPLE", "sampled_tensors", "cosine", "check_lineage"]

log = logging.getLogger(__name__)

#: Below this median cosine between base and checkpoint weights, the base is not the checkpoint's base.
MIN_COSINE = 0.5
#: How many stored tensors are compared per checkpoint (spread evenly over the monitored ones).
SAMPLE = 8
_CHUNK = 1 << 20


class BaseMismatchError(CheckpointMismatchError):
    """The given base is not the model the checkpoint was trained from (its weights are unrelated)."""


def sampled_tensors(plan: ViewPlan, *, sample: int = SAMPLE) -> list[str]:
    """Up to ``sample`` monitored 2-D stored tensors (not norms, not biases), spread evenly in store order."""
    roles = {v.tensor: s.role for s in plan.specs for v in (plan.views[s.name],)}
    names = [t for t in plan.tensors if roles[t] in ("linear", "embedding", "lm_head")]
    if len(names) <= sample:
        return names
    return [names[round(i * (len(names) - 1) / (sample - 1))] for i in range(sample)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """``<a, b> / (|a| |b|)`` in float64 over the flattened tensors; None when either is zero or non-finite."""
    a, b = a.reshape(-1), b.reshape(-1)
    dot = na = nb = 0.0
    for i in range(0, a.numel(), _CHUNK):
        x, y = a[i : i + _CHUNK].double(), b[i : i + _CHUNK].double()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    if not all(math.isfinite(v) for v in (dot, na, nb)) or not (na > 0 and nb > 0):
        return None
    return dot / (na**0.5 * nb**0.5)


def check_lineage(base: TensorSource, checkpoint: TensorSource, plan: ViewPlan, *, sample: int = SAMPLE) -> float | None:
    """The median cosine of the sampled tensors; raises when it says ``checkpoint`` does not descend from ``base``.

    Returns:
        The median cosine, or None when no tensor could be compared (nothing to test; logged).

    Raises:
        BaseMismatchError: the median cosine is below :data:`MIN_COSINE`.
    """
    values = []
    for name in sampled_tensors(plan, sample=sample):
        value = cosine(base.load(name), checkpoint.load(name))
        if value is not None:
            values.append(value)
    if not values:
        log.info("compass-monitor diff: no 2-D weight of %s to test whether it descends from %s (only norms/biases, or zeros)", checkpoint.path, base.path)
        return None
    median = statistics.median(values)
    if median < MIN_COSINE:
        raise BaseMismatchError(
            f"{checkpoint.path} was not trained from the base {base.path}: the median cosine between their weights over "
            f"{len(values)} sampled matrices is {median:.3f} (a fine-tune stays near 1, unrelated models near 0; below "
            f"{MIN_COSINE} is refused); give the base these checkpoints were trained from, or pass --allow-unrelated-base "
            "to compare unrelated models anyway"
        )
    return median
