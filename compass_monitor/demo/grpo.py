"""A short, real GRPO fine-tuning of the pretrained MiniLM policy on the generated task.

One *step* (GRPO iteration):

1. draw ``prompts_per_step`` training prompts;
2. run the current policy once and sample ``group_size`` answers per prompt
   (the log-probs of this forward are the detached "old" log-probs);
3. reward each answer with :func:`task.reward` and normalise within each
   prompt's group: ``A = (r - mean) / (std + adv_eps)``;
4. take ``inner_epochs`` AdamW steps on the PPO clipped surrogate
   ``-mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))`` with
   ``ratio = exp(logp_new - logp_old)``, plus an optional exact KL to the
   initial policy (``kl_coef``, off by default).

So ``steps`` iterations make ``steps * inner_epochs`` optimizer steps. The
model stays in fp32 (the master weights) and in eval mode (no dropout), so the
first inner epoch reuses the rollout forward pass and its ratio is exactly 1.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .policy import DEFAULT_SCALE, MAX_LENGTH, evaluate, log_probs
from .task import Prompt, make_splits, reward

__all__ = [
    "GRPOConfig",
    "TrainResult",
    "train_grpo",
    "linear_weight_bf16_snapshot",
    "bf16_changed_fraction",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GRPOConfig:
    """The hyper-parameters of a run (recorded in :attr:`TrainResult.config`)."""

    steps: int
    prompts_per_step: int
    group_size: int
    lr: float
    clip_eps: float
    inner_epochs: int
    seed: int
    scale: float
    max_length: int
    weight_decay: float
    max_grad_norm: float | None
    adv_eps: float
    kl_coef: float
    n_train: int
    n_eval: int


@dataclass
class TrainResult:
    """What :func:`train_grpo` measured. Curves have one entry per completed step."""

    accuracy_before: float
    accuracy_after: float
    reward_curve: list[float]
    steps: int
    optimizer_steps: int
    seconds: float
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_gain(self) -> float:
        return self.accuracy_after - self.accuracy_before


def _check_fp32(model: torch.nn.Module) -> None:
    bad = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if bad:
        raise ValueError(
            f"train_grpo keeps fp32 master weights; the model has trainable {', '.join(bad)} parameters "
            "(load it with load_pretrained(dtype=torch.float32) or call model.float())"
        )


def train_grpo(
    model: torch.nn.Module,
    tokenizer,
    *,
    steps: int = 80,
    prompts_per_step: int = 16,
    group_size: int = 8,
    lr: float = 1e-5,
    clip_eps: float = 0.2,
    inner_epochs: int = 2,
    seed: int = 0,
    train_prompts: Sequence[Prompt] | None = None,
    eval_prompts: Sequence[Prompt] | None = None,
    n_train: int = 2000,
    n_eval: int = 400,
    scale: float = DEFAULT_SCALE,
    max_length: int = MAX_LENGTH,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    adv_eps: float = 1e-4,
    kl_coef: float = 0.0,
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
    on_step: Callable[[int, dict[str, float]], bool | None] | None = None,
    log_every: int = 10,
    eval_every: int = 0,
) -> TrainResult:
    """GRPO fine-tuning of ``model`` (in place) on the generated sentiment task.

    ``train_prompts`` / ``eval_prompts`` default to :func:`task.make_splits`
    with ``n_train`` / ``n_eval`` and ``seed``. ``on_optimizer(optimizer)`` is
    called once, right after the AdamW optimizer is created and before any
    step (register optimizer hooks there). ``on_step(step, metrics)`` is called
    after each GRPO step (1-based); returning True stops training early.
    ``eval_every > 0`` adds ``eval_accuracy`` to the metrics of every
    ``eval_every``-th step (one pass over the eval prompts each time).
    """
    if steps < 0 or prompts_per_step < 1 or group_size < 2 or inner_epochs < 1:
        raise ValueError("need steps >= 0, prompts_per_step >= 1, group_size >= 2, inner_epochs >= 1")
    _check_fp32(model)
    t0 = time.perf_counter()
    if train_prompts is None or eval_prompts is None:
        gen_train, gen_eval = make_splits(n_train if train_prompts is None else 1,
                                          n_eval if eval_prompts is None else 1, seed=seed)
        train_prompts = gen_train if train_prompts is None else train_prompts
        eval_prompts = gen_eval if eval_prompts is None else eval_prompts
    train_prompts, eval_prompts = list(train_prompts), list(eval_prompts)
    if not train_prompts or not eval_prompts:
        raise ValueError("train and eval prompts must be non-empty")
    cfg = GRPOConfig(steps, prompts_per_step, group_size, lr, clip_eps, inner_epochs, seed, scale,
                     max_length, weight_decay, max_grad_norm, adv_eps, kl_coef,
                     len(train_prompts), len(eval_prompts))
    pol_kw = dict(scale=scale, max_length=max_length)

    model.eval()  # no dropout: the policy is a deterministic function of the weights
    eval_before = evaluate(model, tokenizer, eval_prompts, **pol_kw)
    logger.info("GRPO start: eval accuracy %.3f (negated %.3f, plain %.3f) on %d prompts",
                eval_before["accuracy"], eval_before["accuracy_negated"],
                eval_before["accuracy_plain"], len(eval_prompts))

    ref_model = None
    if kl_coef > 0:
        ref_model = copy.deepcopy(model).requires_grad_(False)

    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel is an order of magnitude faster than the foreach one on CPU for this model.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if on_optimizer is not None:
        on_optimizer(optimizer)

    rng = random.Random(f"compass-demo-grpo:{seed}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    reward_curve: list[float] = []
    history: list[dict[str, float]] = []
    opt_steps = 0
    stopped = False

    def policy_lp(m: torch.nn.Module, texts: list[str]) -> torch.Tensor:
        # One encoder call on prompts + label prototypes (see policy.policy_logits).
        return log_probs(m, tokenizer, texts, **pol_kw)

    for step in range(1, steps + 1):
        ts = time.perf_counter()
        batch = rng.sample(train_prompts, min(prompts_per_step, len(train_prompts)))
        texts = [p.text for p in batch]

        # Rollout with the current policy; keep the graph for the first inner epoch.
        lp = policy_lp(model, texts)
        old_lp_all = lp.detach()
        actions = torch.multinomial(old_lp_all.exp().cpu(), group_size, replacement=True, generator=gen)
        rewards = torch.tensor([[reward(p, int(a)) for a in row] for p, row in zip(batch, actions)])
        adv = (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + adv_eps)
        actions, adv = actions.to(device), adv.to(device)
        old_lp = old_lp_all.gather(1, actions)
        ref_lp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_lp = policy_lp(ref_model, texts)

        losses, clip_fracs, kls = [], [], []
        for epoch in range(inner_epochs):
            if epoch > 0:
                lp = policy_lp(model, texts)
            ratio = torch.exp(lp.gather(1, actions) - old_lp)
            surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
            loss = -surrogate.mean()
            if ref_lp is not None:
                kl = (lp.exp() * (lp - ref_lp)).sum(dim=-1).mean()
                loss = loss + kl_coef * kl
                kls.append(kl.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            opt_steps += 1
            losses.append(loss.item())
            clip_fracs.append(((ratio.detach() - 1).abs() > clip_eps).float().mean().item())

        mean_r = float(rewards.mean())
        reward_curve.append(mean_r)
        metrics: dict[str, float] = {
            "step": step,
            "optimizer_steps": opt_steps,
            "reward": mean_r,
            "loss": sum(losses) / len(losses),
            "clip_frac": clip_fracs[-1],
            "entropy": float(-(old_lp_all.exp() * old_lp_all).sum(dim=-1).mean()),
            "frac_groups_with_signal": float((rewards.std(dim=1) > 0).float().mean()),
            "seconds": time.perf_counter() - ts,
        }
        if kls:
            metrics["kl"] = kls[-1]
        if eval_every > 0 and step % eval_every == 0:
            metrics["eval_accuracy"] = evaluate(model, tokenizer, eval_prompts, **pol_kw)["accuracy"]
        history.append(metrics)
        if log_every > 0 and (step % log_every == 0 or step == steps):
            window = reward_curve[-log_every:]
            logger.info("GRPO step %d/%d: reward %.3f (last %d: %.3f) loss %.4f entropy %.3f clip %.3f%s",
                        step, steps, mean_r, len(window), sum(window) / len(window), metrics["loss"],
                        metrics["entropy"], metrics["clip_frac"],
                        f" eval {metrics['eval_accuracy']:.3f}" if "eval_accuracy" in metrics else "")
        if on_step is not None and on_step(step, dict(metrics)):
            stopped = step < steps
            break

    eval_after = evaluate(model, tokenizer, eval_prompts, **pol_kw)
    seconds = time.perf_counter() - t0
    logger.info("GRPO done: %d steps (%d optimizer steps) in %.1f s; eval accuracy %.3f -> %.3f",
                len(reward_curve), opt_steps, seconds, eval_before["accuracy"], eval_after["accuracy"])
    return TrainResult(
        accuracy_before=eval_before["accuracy"],
        accuracy_after=eval_after["accuracy"],
        reward_curve=reward_curve,
        steps=len(reward_curve),
        optimizer_steps=opt_steps,
        seconds=seconds,
        eval_before=eval_before,
        eval_after=eval_after,
        history=history,
        stopped_early=stopped,
        config=asdict(cfg),
    )


@torch.no_grad()
def linear_weight_bf16_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """bf16 copies of every ``nn.Linear`` weight, keyed by parameter name."""
    return {f"{name}.weight": mod.weight.detach().to(torch.bfloat16).clone()
            for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


@torch.no_grad()
def bf16_changed_fraction(base: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    """Fraction of linear-weight elements whose bf16 value differs from ``base``.

    A quick check that the optimizer moved bf16-visible weights; the monitor's
    exact probe (``compass_monitor.bf16``) is the reference implementation.
    """
    params = dict(model.named_parameters())
    changed = total = 0
    for name, b in base.items():
        cur = params[name].detach().to(torch.bfloat16)
        changed += int((cur.view(torch.int16) != b.view(torch.int16)).sum())
        total += b.numel()
    return changed / total if total else math.nan
