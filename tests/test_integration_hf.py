"""CompassTrainerCallback on a real transformers Trainer and TRL trainers (CPU, tiny random Llama)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from _tiny_lm import addition_prompts, tiny_llama, tiny_tokenizer  # noqa: E402
from compass_monitor import MonitorConfig, open_run  # noqa: E402
from compass_monitor.aggregates import by_module_type, everything_linear, group_stats, scalars  # noqa: E402
from compass_monitor.integrations.hf import CompassTrainerCallback, watch  # noqa: E402

CONFIG = MonitorConfig(every_n_steps=2, principal_rank=4)


def _store_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    run = open_run(run_dir)
    stats = {**group_stats(run, everything_linear), **group_stats(run, by_module_type)}
    return {step: scalars(stats, index=i) for i, step in enumerate(run.steps.tolist())}


def _logged_scalars(log_history: list[dict]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for record in log_history:
        values = {k: v for k, v in record.items() if k.startswith("compass/")}
        if values:
            assert record["step"] not in out, "one log record per snapshot"
            out[record["step"]] = values
    return out


def _same(a: float, b: float) -> bool:
    """Equal up to float64 summation order: the live scalars aggregate one snapshot, ``group_stats`` all of
    them at once, and numpy's reduction order (so the last bit of a sum) can differ between the two."""
    return a == pytest.approx(b, rel=1e-12, abs=1e-300) or (math.isnan(a) and math.isnan(b))


def _lm_dataset(tokenizer, n: int = 64) -> Dataset:
    texts = [row["prompt"] + row["answer"] for row in addition_prompts(n)]
    ids = tokenizer(texts)["input_ids"]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(out: Path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def test_trainer_with_gradient_accumulation_logs_to_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    tokenizer = tiny_tokenizer()
    args = _args(tmp_path / "out", max_steps=6, gradient_accumulation_steps=2, report_to="tensorboard")
    trainer = Trainer(model=tiny_llama(tokenizer), args=args, train_dataset=_lm_dataset(tokenizer))
    watch(trainer, tmp_path / "run", config=CONFIG)
    trainer.train()

    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [2, 4, 6]  # optimizer steps, not the 12 micro-batches
    assert run.status == "finished"
    assert {p.module_type for p in run.params} == {"q", "k", "v", "o", "gate", "up", "down"}
    stored = _store_scalars(tmp_path / "run")
    logged = _logged_scalars(trainer.state.log_history)
    assert sorted(logged) == [2, 4, 6]
    for step, values in stored.items():
        assert set(logged[step]) == set(values)
        assert [k for k, v in values.items() if not _same(logged[step][k], v)] == []

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    sparsity = [(e.step, e.value) for e in events.Scalars("train/compass/all_linear/sparsity")]
    assert sparsity == [(step, pytest.approx(stored[step]["compass/all_linear/sparsity"], abs=1e-7)) for step in (2, 4, 6)]
    null_q = [(e.step, e.value) for e in events.Scalars("train/compass/q/null_low")]
    assert null_q == [(step, pytest.approx(stored[step]["compass/q/null_low"], rel=1e-6, nan_ok=True)) for step in (2, 4, 6)]


def test_callback_in_trainer_arguments_and_skipped_steps(tmp_path):
    """``Trainer(callbacks=[...])`` works (scalars in log_history); a step the optimizer skipped does not count."""

    class SkipEveryThird(TrainerCallback):
        """Stands in for a GradScaler that skips a non-finite step: the torch optimizer's step() does not run."""

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = optimizer.optimizer
            original = inner.step
            self.calls = 0

            def step(*a, **k):
                self.calls += 1
                return None if self.calls % 3 == 0 else original(*a, **k)

            inner.step = step

    tokenizer = tiny_tokenizer()
    callback = CompassTrainerCallback(tmp_path / "run", config=MonitorConfig(every_n_steps=2, principal_rank=4), log_groups=["all_linear"])
    trainer = Trainer(
        model=tiny_llama(tokenizer),
        args=_args(tmp_path / "out", max_steps=7),
        train_dataset=_lm_dataset(tokenizer),
        callbacks=[SkipEveryThird(), callback],
    )
    trainer.train()
    assert trainer.state.global_step == 7
    assert callback.step == 5  # steps 3 and 6 did not run
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [2, 4, 5]  # 5: the last step always gets a snapshot
    logged = _logged_scalars(trainer.state.log_history)
    assert all(key.startswith("compass/all_linear/") for values in logged.values() for key in values)
    stored = _store_scalars(tmp_path / "run")
    # log records are labelled with the Trainer's global step; the monitor's step counts real steps only
    assert [values["compass/all_linear/sparsity"] for _, values in sorted(logged.items())] == [
        stored[s]["compass/all_linear/sparsity"] for s in (2, 4, 5)
    ]


def test_fsdp2_sharded_model(tmp_path):
    """A model sharded with FSDP2 (DTensor parameters, CPU gloo group of one): monitored on every process.
    In its own process (tests/_hf_fsdp2_run.py)."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "_hf_fsdp2_run.py")
    distributed = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in distributed}
    out = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert open_run(tmp_path / "run").steps.tolist() == [2, 4]
    logged = _logged_scalars(result["trained"])
    for step, values in _store_scalars(tmp_path / "run").items():
        assert [k for k, v in values.items() if not _same(logged[step][k], v)] == []


def _reward(completions, answer, **kwargs):
    """Verifiable: 1 for the right sum first, 0.3 for any digit first, else 0."""
    return [1.0 if c.startswith(a) else 0.3 if c[:1].isdigit() else 0.0 for c, a in zip(completions, answer)]


def test_trl_grpo_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = tiny_tokenizer()
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=3,
        learning_rate=1e-2,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=tiny_llama(tokenizer, seed=1),
        reward_funcs=_reward,
        args=args,
        train_dataset=Dataset.from_list(addition_prompts(32)),
        processing_class=tokenizer,
    )
    watch(trainer, tmp_path / "run", config=CONFIG)
    trainer.train()
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [2, 4]
    logged = _logged_scalars(trainer.state.log_history)
    stored = _store_scalars(tmp_path / "run")
    assert sorted(logged) == [2, 4]
    for step in (2, 4):
        assert all(_same(logged[step][k], v) for k, v in stored[step].items())
        record = next(r for r in trainer.state.log_history if r.get("step") == step and "reward" in r)
        assert "compass/all_linear/sparsity" in record  # in the same record as GRPO's own metrics


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = tiny_tokenizer()
    rows = [{"prompt": r["prompt"], "completion": r["answer"]} for r in addition_prompts(32)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=tiny_llama(tokenizer, seed=2), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    watch(trainer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=4))
    trainer.train()
    assert open_run(tmp_path / "run").steps.tolist() == [1, 2, 3]
    assert sorted(_logged_scalars(trainer.state.log_history)) == [1, 2, 3]


class CrashAt(TrainerCallback):
    """Stops training with an error after optimizer step ``step`` (a crash after the last checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_from_checkpoint(tmp_path):
    """Crash at step 6 after a checkpoint at step 4; ``train(resume_from_checkpoint=...)`` continues the store."""
    tokenizer = tiny_tokenizer()
    dataset = _lm_dataset(tokenizer)
    args = _args(tmp_path / "out", max_steps=8, gradient_accumulation_steps=2, save_strategy="steps", save_steps=4)
    model = tiny_llama(tokenizer, seed=4)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    crashing = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[CrashAt(6)])
    watch(crashing, tmp_path / "run", config=CONFIG)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    crashing.callback_handler.callbacks[0].monitor.flush()  # the process would die here; its writer had committed
    crashed = open_run(tmp_path / "run")
    assert crashed.steps.tolist() == [2, 4, 6]
    before = crashed.counts[:2].copy()

    resumed_model = tiny_llama(tokenizer, seed=5)  # other weights: the checkpoint's are loaded into it
    resumed = Trainer(model=resumed_model, args=args, train_dataset=dataset)
    callback = watch(resumed, tmp_path / "run", config=CONFIG)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert callback.step == 8

    run = open_run(tmp_path / "run")
    assert run.status == "finished"
    assert run.steps.tolist() == [2, 4, 6, 8]
    np.testing.assert_array_equal(run.counts[:2], before)
    weights = dict(resumed_model.named_parameters())
    for p in run.params:  # measured against the original W0 (reloaded from the store), not the checkpoint
        direct = (weights[p.name].detach().to(torch.bfloat16) != initial[p.name].to(torch.bfloat16)).numpy()
        np.testing.assert_array_equal(run.mask(p.name, -1), direct, err_msg=p.name)
    logged = _logged_scalars(resumed.state.log_history)  # the history before step 4 comes from the checkpoint
    assert sorted(logged) == [2, 4, 6, 8]
    for step, values in _store_scalars(tmp_path / "run").items():
        assert [k for k, v in values.items() if not _same(logged[step][k], v)] == []


def test_train_twice_continues_the_same_store(tmp_path):
    """A second ``trainer.train()`` never raises into training (it used to: StoreExistsError); the store goes on
    at the real optimizer step, measured against the first training's W0."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=2)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = Trainer(model=model, args=_args(tmp_path / "out", max_steps=4), train_dataset=_lm_dataset(tokenizer))
    callback = watch(trainer, tmp_path / "run", config=CONFIG)
    trainer.train()
    trainer.train()
    assert callback.step == 8 and callback.monitor.step == 8
    run = open_run(tmp_path / "run")
    assert run.status == "finished"
    assert run.steps.tolist() == [2, 4, 6, 8]
    weights = dict(model.named_parameters())
    for p in run.params:
        direct = (weights[p.name].detach().to(torch.bfloat16) != initial[p.name].to(torch.bfloat16)).numpy()
        np.testing.assert_array_equal(run.mask(p.name, -1), direct, err_msg=p.name)
    # The second train() has its own TrainerState: it logs at its steps 2 and 4 the snapshots of steps 6 and 8.
    logged, stored = _logged_scalars(trainer.state.log_history), _store_scalars(tmp_path / "run")
    assert sorted(logged) == [2, 4]
    for trainer_step, step in ((2, 6), (4, 8)):
        assert [k for k, v in stored[step].items() if not _same(logged[trainer_step][k], v)] == []


def test_restored_callback_states_keep_logging_to_tensorboard(tmp_path, monkeypatch, caplog):
    """``restore_callback_states_from_checkpoint=True``: transformers rebuilds the callback from the checkpoint and
    appends it after TensorBoard; it must stay attached, move to the front, and its scalars reach the TensorBoard
    event files at every snapshot step after the resume."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tokenizer = tiny_tokenizer()
    dataset = _lm_dataset(tokenizer)
    args = _args(
        tmp_path / "out", max_steps=8, save_strategy="steps", save_steps=4, report_to="tensorboard",
        restore_callback_states_from_checkpoint=True,
    )  # fmt: skip
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb_crashed"))
    crashing = Trainer(model=tiny_llama(tokenizer, seed=4), args=args, train_dataset=dataset, callbacks=[CrashAt(6)])
    watch(crashing, tmp_path / "run", config=CONFIG)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    crashing.callback_handler.callbacks[0].monitor.flush()

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb_resumed"))
    resumed = Trainer(model=tiny_llama(tokenizer, seed=5), args=args, train_dataset=dataset)
    attached = watch(resumed, tmp_path / "run", config=CONFIG)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    live = resumed.callback_handler.callbacks[0]
    assert isinstance(live, CompassTrainerCallback) and live is not attached  # transformers rebuilt it
    assert live.step == 8 and live.monitor is not None and live.monitor.step == 8
    assert "not to ['tensorboard']" not in caplog.text

    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [2, 4, 6, 8] and run.status == "finished"
    stored = _store_scalars(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "tb_resumed"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("all_linear/sparsity", "q/overlap_low", "down/flips"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/compass/{key}")]
        assert logged == [(step, pytest.approx(stored[step][f"compass/{key}"], rel=1e-6, nan_ok=True)) for step in (6, 8)], key
