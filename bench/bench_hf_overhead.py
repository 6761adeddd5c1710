"""Overhead of CompassTrainerCallback on a Hugging Face Trainer run (CPU), monitored vs unmonitored.

A small random-init Llama-shaped causal LM (4 layers, hidden 256, intermediate
688; 3.2M weights in its 28 linear matrices) is trained with the stock
``transformers.Trainer`` (AdamW, fp32 master weights) on random token
sequences, with a snapshot on **every** optimizer step (``every_n_steps=1``,
the monitor's most expensive setting; the default is every 10 steps). Runs
without and with the monitor alternate in one process (plain, monitored,
plain, monitored, ...), from the same initial weights and data, so that both
see the same machine load.

Reported per pair and as the median over pairs:

* ``step_ratio``: mean wall time of an optimizer step (steps after a warm-up,
  measured between consecutive ``on_step_end`` events, so a step includes its
  snapshot), monitored / unmonitored. The goal is at most 1.10.
* ``step_cpu_ratio``: the same with the process's CPU time (all threads,
  including the store's writer thread) instead of wall time; less sensitive to
  other processes on the machine (the load average is recorded).
* ``run_ratio``: wall time of the whole ``trainer.train()`` call, which also
  includes the monitor's one-time set-up (base capture, principal masks, store
  creation) and its final flush.

Usage: python bench/bench_hf_overhead.py [--steps 40] [--pairs 3] [--every 1]
Writes bench/results/hf_overhead_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from compass_monitor import MonitorConfig
from compass_monitor.integrations.hf import watch

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, SEQ, BATCH = 512, 256, 688, 4, 128, 8


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step (runs after every other callback)."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())  # CPU time of every thread of the process (the store writer's too)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(state: dict[str, torch.Tensor] | None = None) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if state is not None:
        model.load_state_dict(state)
    return model


def run_once(workdir: Path, state, data, *, steps: int, monitored: bool, every: int) -> dict[str, float]:
    args = TrainingArguments(
        output_dir=str(workdir / "out"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    clock = StepClock()
    trainer = Trainer(model=build_model(state), args=args, train_dataset=data, callbacks=[clock])
    if monitored:
        watch(trainer, workdir / "run", config=MonitorConfig(every_n_steps=every, principal_rank=64))
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    warmup = 5
    intervals = np.diff(clock.marks)[warmup:]
    cpu = np.diff(clock.cpu_marks)[warmup:]
    return {
        "run_s": total,
        "step_mean_s": float(intervals.mean()),
        "step_median_s": float(np.median(intervals)),
        "step_cpu_mean_s": float(cpu.mean()),
    }


def machine() -> dict[str, object]:
    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            model_name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": model_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--every", type=int, default=1, help="snapshot every N optimizer steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hf_overhead_cpu.json")
    options = parser.parse_args()

    transformers.logging.set_verbosity_error()
    state = {k: v.clone() for k, v in build_model().state_dict().items()}
    data = TokenData(options.steps * BATCH)
    linear = sum(p.numel() for n, p in build_model().named_parameters() if p.dim() == 2 and "proj" in n)
    pairs = []
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(options.pairs):
            results = {}
            for monitored in (False, True):
                workdir = Path(tmp) / f"{i}-{monitored}"
                results[monitored] = run_once(workdir, state, data, steps=options.steps, monitored=monitored, every=options.every)
                shutil.rmtree(workdir, ignore_errors=True)
            pair = {
                "plain": results[False],
                "monitored": results[True],
                "step_ratio": results[True]["step_mean_s"] / results[False]["step_mean_s"],
                "run_ratio": results[True]["run_s"] / results[False]["run_s"],
                "step_cpu_ratio": results[True]["step_cpu_mean_s"] / results[False]["step_cpu_mean_s"],
            }
            pairs.append(pair)
            print(f"pair {i}: step ratio {pair['step_ratio']:.3f} (CPU time {pair['step_cpu_ratio']:.3f}), "
                  f"run ratio {pair['run_ratio']:.3f} "
                  f"(plain step {results[False]['step_mean_s'] * 1e3:.0f} ms)", flush=True)

    report = {
        "benchmark": "HF Trainer step time, CompassTrainerCallback (snapshot every step) vs none",
        "machine": machine(),
        "model": f"LlamaForCausalLM, {LAYERS} layers, hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocab {VOCAB}, random init",
        "monitored_linear_weights": linear,
        "batch": f"{BATCH} x {SEQ} tokens, AdamW, fp32",
        "steps_per_run": options.steps,
        "warmup_steps_excluded": 5,
        "every_n_steps": options.every,
        "pairs": pairs,
        "step_ratio_median": statistics.median(p["step_ratio"] for p in pairs),
        "run_ratio_median": statistics.median(p["run_ratio"] for p in pairs),
        "step_cpu_ratio_median": statistics.median(p["step_cpu_ratio"] for p in pairs),
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "goal": "step_ratio_median <= 1.10",
        "note": "runs alternate in one process on a shared 2-core machine; read the ratios, not the absolute times",
    }
    report["goal_met"] = report["step_ratio_median"] <= 1.10
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"median step ratio {report['step_ratio_median']:.3f}, run ratio {report['run_ratio_median']:.3f} -> {options.out}")


if __name__ == "__main__":
    main()
