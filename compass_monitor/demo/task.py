"""A generated 4-answer review-sentiment task with negations and a verifiable answer.

Sentences are built from templates, so the correct label follows from a rule
(see :func:`answer_for`) rather than from human annotation:

* no negation: the label has the adjective's polarity; it is the *strong* label
  ("very ...") when the adjective is strong ("excellent", "awful") or an
  intensifier precedes it ("really good");
* a negation ("not", "hardly", "never", "far from", ...) flips the polarity and
  gives the *mild* label: "not good" -> negative, "far from terrible" -> positive,
  "not very good" -> negative.

Train and eval splits are disjoint by construction: every distinct sentence is
assigned to one split by a stable hash of its text, independent of the seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "LABELS",
    "NEGATIONS",
    "INTENSIFIERS",
    "Prompt",
    "answer_for",
    "make_prompt",
    "split_of",
    "generate_prompts",
    "make_splits",
    "reward",
    "label_counts",
]

#: The label set, in answer-index order.
LABELS: tuple[str, ...] = ("very negative", "negative", "positive", "very positive")

SUBJECTS: tuple[str, ...] = (
    "movie", "film", "book", "album", "restaurant", "meal", "service", "hotel",
    "concert", "show", "game", "phone", "laptop", "coffee", "pizza", "trip",
)

#: (adjective, polarity +1/-1, strong?)
ADJECTIVES: tuple[tuple[str, int, bool], ...] = (
    ("good", +1, False), ("nice", +1, False), ("pleasant", +1, False),
    ("enjoyable", +1, False), ("solid", +1, False), ("decent", +1, False),
    ("excellent", +1, True), ("amazing", +1, True), ("wonderful", +1, True),
    ("fantastic", +1, True), ("outstanding", +1, True), ("superb", +1, True),
    ("bad", -1, False), ("poor", -1, False), ("disappointing", -1, False),
    ("dull", -1, False), ("bland", -1, False), ("weak", -1, False),
    ("terrible", -1, True), ("awful", -1, True), ("horrible", -1, True),
    ("dreadful", -1, True), ("atrocious", -1, True), ("abysmal", -1, True),
)

NEGATIONS: tuple[str, ...] = ("not", "hardly", "never", "far from", "anything but", "by no means")
INTENSIFIERS: tuple[str, ...] = ("very", "really", "extremely", "truly", "incredibly")

# "{s}" subject, "{v}" copula, "{p}" predicate (negation + intensifier + adjective).
TEMPLATES: tuple[str, ...] = (
    "The {s} {v} {p}.",
    "Honestly, the {s} {v} {p}.",
    "I thought the {s} {v} {p}.",
    "Overall the {s} {v} {p}.",
    "Our {s} {v} {p}, to be fair.",
    "In my opinion this {s} {v} {p}.",
)
COPULAS: tuple[str, ...] = ("was", "is", "felt", "seemed")

# Only "not" reads naturally before an intensifier ("not very good").
_NEG_WITH_INTENSIFIER = ("not",)

_ADJ_INDEX = {a: (pol, strong) for a, pol, strong in ADJECTIVES}


@dataclass(frozen=True)
class Prompt:
    """One task instance: the review sentence and the index of its correct label."""

    text: str
    answer: int
    negated: bool = False

    @property
    def label(self) -> str:
        return LABELS[self.answer]


def answer_for(adjective: str, negation: str | None = None, intensifier: str | None = None) -> int:
    """The verifiable answer index for an (adjective, negation, intensifier) triple."""
    try:
        polarity, strong = _ADJ_INDEX[adjective]
    except KeyError:
        raise ValueError(f"unknown adjective {adjective!r}") from None
    if negation is not None:
        return 1 if polarity > 0 else 2  # flipped, mild
    if strong or intensifier is not None:
        return 3 if polarity > 0 else 0
    return 2 if polarity > 0 else 1


def make_prompt(
    subject: str,
    adjective: str,
    negation: str | None = None,
    intensifier: str | None = None,
    template: int = 0,
    copula: str = "was",
) -> Prompt:
    """Build one sentence from its parts and label it with :func:`answer_for`."""
    if negation is not None and intensifier is not None and negation not in _NEG_WITH_INTENSIFIER:
        raise ValueError(f"negation {negation!r} cannot take an intensifier")
    pred = " ".join(w for w in (negation, intensifier, adjective) if w)
    text = TEMPLATES[template].format(s=subject, v=copula, p=pred)
    return Prompt(text=text, answer=answer_for(adjective, negation, intensifier), negated=negation is not None)


def split_of(text: str, eval_fraction: float = 0.2) -> str:
    """'train' or 'eval' for a sentence, by a stable (seed-independent) hash of its text."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return "eval" if (h % 10_000) < int(eval_fraction * 10_000) else "train"


def _random_prompt(rng: random.Random, negation_rate: float, intensifier_rate: float) -> Prompt:
    subject = rng.choice(SUBJECTS)
    adjective, _, _ = rng.choice(ADJECTIVES)
    negation = rng.choice(NEGATIONS) if rng.random() < negation_rate else None
    intensifier = None
    if negation is None or negation in _NEG_WITH_INTENSIFIER:
        if rng.random() < intensifier_rate:
            intensifier = rng.choice(INTENSIFIERS)
    return make_prompt(
        subject, adjective, negation, intensifier,
        template=rng.randrange(len(TEMPLATES)), copula=rng.choice(COPULAS),
    )


def generate_prompts(
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    negation_rate: float = 0.3,
    intensifier_rate: float = 0.35,
    eval_fraction: float = 0.2,
) -> list[Prompt]:
    """``n`` distinct prompts from ``split`` ('train' or 'eval'), deterministic given ``seed``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    rng = random.Random(f"compass-demo-task:{seed}:{split}")
    out: list[Prompt] = []
    seen: set[str] = set()
    attempts = 0
    max_attempts = 200 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could not draw {n} distinct {split} prompts; ask for fewer")
        p = _random_prompt(rng, negation_rate, intensifier_rate)
        if p.text in seen or split_of(p.text, eval_fraction) != split:
            continue
        seen.add(p.text)
        out.append(p)
    return out


def make_splits(n_train: int = 2000, n_eval: int = 400, *, seed: int = 0, **kwargs) -> tuple[list[Prompt], list[Prompt]]:
    """Disjoint (train, eval) prompt lists."""
    return (
        generate_prompts(n_train, seed=seed, split="train", **kwargs),
        generate_prompts(n_eval, seed=seed, split="eval", **kwargs),
    )


def reward(prompt: Prompt, choice: int) -> float:
    """Verifiable reward: 1.0 if ``choice`` is the correct label index, else 0.0."""
    return 1.0 if int(choice) == prompt.answer else 0.0


def label_counts(prompts: Sequence[Prompt]) -> list[int]:
    counts = [0] * len(LABELS)
    for p in prompts:
        counts[p.answer] += 1
    return counts
