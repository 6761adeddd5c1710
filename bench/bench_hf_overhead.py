"""Overhead of CompassTrainerCallback on a Hugging Face Trainer run (CPU), monitored vs unmonitored.

A small random-init Llama-shaped causal LM (4 layers, hidden 256, intermediate
688; 3.2M weights in its 28 linear matrices) is trained with the stock
``transformers.Trainer`` (AdamW, fp32 master weights) on random token
sequences, with a snapshot on **every** optimizer step (``every_n_steps=1``,
the monitor's most expensive setting), and, for comparison, every 10 steps
(the default). Runs
without and with the monitor alternate in one process (plain, monitored,
plain, monitored, ...), from the same initial weights and data, so that both
see the same machine load.

Reported per pair and as the median over pairs (many short pairs: on a
shared machine other processes' load drifts, and the median of alternating
pairs is what stays comparable):

* ``step_ratio``: mean wall time of an optimizer step (steps after a warm-up,
  measured between consecutive ``on_step_end`` events, so a step includes its
  snapshot), monitored / unmonitored. The goal is at most 1.10.
* ``step_cpu_ratio``: the same with the process's CPU time (all threads,
  including the store's writer thread) instead of wall time; less sensitive to
  other processes on the machine (the load average is recorded).
* ``run_ratio``: wall time of the whole ``trainer.train()`` call, which also
  includes the monitor's one-time set-up (base capture, principal masks, store
  creation) and its final flush.

And, from the monitored runs alone (robust to other processes' load, since
both parts are measured at the same moments): ``attributed_step_ratio`` =
step time / (step time - time the training thread spent inside the monitor's
callbacks), and the CPU time of the store's writer thread per step, which runs
beside training and competes with it for cores.

The run stores of all runs are kept until the end and deleted together: on
this VM's ext4, deleting thousands of files makes the next file creations
10-40x slower for a while (``bench/bench_fs_files.py``), which would charge the
monitor's writer for the benchmark's own clean-up.

GPU (``--device cuda``): the same comparison in bf16 mixed precision
(``TrainingArguments(bf16=True)``: fp32 master weights, bf16 autocast), on a
larger Llama (``--hidden 1024 --intermediate 2816 --layers 8`` by default on
CUDA); each step mark waits for the device (``torch.cuda.synchronize``) in
both arms. Writes bench/results/hf_overhead_<gpu-name>.json.

Usage: python bench/bench_hf_overhead.py [--device cpu|cuda] [--steps 20] [--pairs 7] [--every 1 10] [--batch 8]
       [--hidden H --intermediate I --layers L] [--torch-threads N] [--out FILE]
Writes bench/results/hf_overhead_cpu.json (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from compass_monitor import MonitorConfig
from compass_monitor.integrations.hf import watch

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, SEQ, BATCH = 512, 256, 688, 4, 128, 8
# The model's shape; main() replaces it from the command line (--hidden, --intermediate, --layers).
SHAPE = {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "layers": LAYERS}
CUDA_SHAPE = {"hidden": 1024, "intermediate": 2816, "layers": 8}


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step (runs after every other callback)."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the step's kernels are done (both arms alike)
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
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=max(4, SHAPE["hidden"] // 128),
        num_key_value_heads=max(4, SHAPE["hidden"] // 128),
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if state is not None:
        model.load_state_dict(state)
    return model


def run_once(workdir: Path, state, data, *, steps: int, monitored: bool, every: int, batch: int, device: str = "cpu") -> dict[str, float]:
    args = TrainingArguments(
        output_dir=str(workdir / "out"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=device != "cpu",  # mixed precision: fp32 masters, bf16 autocast
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    clock = StepClock()
    trainer = Trainer(model=build_model(state), args=args, train_dataset=data, callbacks=[clock])
    # Both arms: no console echo of each logs dict (with every_n_steps=1 the monitored arm logs every
    # step, ~100 scalars; what that costs depends on the user's loggers, not on the monitor).
    trainer.remove_callback(PrinterCallback)
    spent = {"on_step_end": [], "on_log": [0.0]}
    writer_cpu = [0.0]
    if monitored:
        callback = watch(trainer, workdir / "run", config=MonitorConfig(every_n_steps=every, principal_rank=64))
        for event in spent:
            _time_calls(callback, event, spent[event])
        closing = callback.on_train_end

        def on_train_end(*args, **kwargs):
            writer_cpu[0] = _writer_cpu()  # before close() ends the writer thread
            return closing(*args, **kwargs)

        callback.on_train_end = on_train_end
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    intervals = np.diff(clock.marks)[WARMUP:]
    cpu = np.diff(clock.cpu_marks)[WARMUP:]
    result = {
        "run_s": total,
        "step_mean_s": float(intervals.mean()),
        "step_median_s": float(np.median(intervals)),
        "step_cpu_mean_s": float(cpu.mean()),
    }
    if monitored:
        in_monitor = float(np.sum(spent["on_step_end"][WARMUP + 1 :]) + spent["on_log"][0] * len(intervals) / len(clock.marks))
        step_total = float(intervals.sum())
        result["in_callback_per_step_s"] = in_monitor / len(intervals)
        result["attributed_step_ratio"] = step_total / (step_total - in_monitor)
        result["writer_thread_cpu_per_step_s"] = writer_cpu[0] / len(clock.marks)
    return result


WARMUP = 3


def _time_calls(callback: TrainerCallback, event: str, sink: list[float]) -> None:
    """Record the wall time of each call of ``callback.<event>`` (on_log: summed into sink[0])."""
    original = getattr(callback, event)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if event == "on_log":
                sink[0] += time.perf_counter() - start
            else:
                sink.append(time.perf_counter() - start)

    setattr(callback, event, timed)


_writer_cpu_seen: dict[int, float] = {}


def _writer_cpu() -> float:
    """CPU seconds of the store writer threads started since the last call (psutil, per native thread id)."""
    import threading

    import psutil

    ids = {t.native_id for t in threading.enumerate() if t.name == "compass-monitor-writer"}
    total = 0.0
    for thread in psutil.Process().threads():
        if thread.id in ids or thread.id in _writer_cpu_seen:
            used = thread.user_time + thread.system_time
            total += used - _writer_cpu_seen.get(thread.id, 0.0)
            _writer_cpu_seen[thread.id] = used
    return total


def snapshot_costs(state, repeats: int = 5, device: str = "cpu") -> dict[str, float]:
    """Where a snapshot's time goes, outside any Trainer: measuring (synchronous) vs writing it to the store."""
    from compass_monitor import CompassMonitor

    model = build_model(state).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = TokenData(BATCH)[0]["input_ids"].repeat(BATCH, 1).to(device)
    measure, write, measure_cpu, write_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        monitor = CompassMonitor(model, Path(tmp) / "run", config=MonitorConfig(every_n_steps=1, principal_rank=64))
        monitor.flush()
        for _ in range(repeats):
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if device != "cpu":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            monitor.on_optimizer_step()
            t1, c1 = time.perf_counter(), time.process_time()
            monitor.flush()
            measure.append(t1 - t), measure_cpu.append(c1 - c)
            write.append(time.perf_counter() - t1), write_cpu.append(time.process_time() - c1)
        monitor.close()
    return {
        "measure_s_median": statistics.median(measure),
        "measure_cpu_s_median": statistics.median(measure_cpu),
        "store_write_s_median": statistics.median(write),
        "store_write_cpu_s_median": statistics.median(write_cpu),
    }


def machine(device: str = "cpu") -> dict[str, object]:
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
        "device": "cpu" if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 mixed precision)")
    parser.add_argument("--hidden", type=int, default=None, help=f"default {HIDDEN} on cpu, {CUDA_SHAPE['hidden']} on cuda")
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10], help="snapshot cadences to measure (optimizer steps)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"sequences of {SEQ} tokens per optimizer step")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's, all cores)")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    cuda = options.device != "cpu"
    for key in SHAPE:
        SHAPE[key] = getattr(options, key) or (CUDA_SHAPE if cuda else SHAPE)[key]
    if options.out is None:
        name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(torch.device(options.device)).lower()).strip("-") if cuda else "cpu"
        options.out = Path(__file__).parent / "results" / f"hf_overhead_{name}.json"

    transformers.logging.set_verbosity_error()
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    state = {k: v.clone() for k, v in build_model().state_dict().items()}
    data = TokenData(options.steps * options.batch)
    linear = sum(p.numel() for n, p in build_model().named_parameters() if p.dim() == 2 and "proj" in n)
    load_before = list(os.getloadavg())
    # Before the runs, whose stores are deleted together at the end (see below).
    one_snapshot = snapshot_costs(state, device=options.device)
    by_cadence: dict[int, list[dict]] = {every: [] for every in options.every}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(options.pairs):
            for every in options.every:
                results = {}
                for monitored in ((False, True) if i % 2 == 0 else (True, False)):  # alternate which runs first
                    workdir = Path(tmp) / f"{i}-{every}-{monitored}"
                    results[monitored] = run_once(
                        workdir, state, data, steps=options.steps, monitored=monitored, every=every, batch=options.batch, device=options.device
                    )
                    # Run stores are kept until the end: deleting thousands of files between runs
                    # makes this disk's next file creations 10-40x slower for a while
                    # (bench/bench_fs_files.py), a cost no real training run pays.
                pair = {
                    "plain": results[False],
                    "monitored": results[True],
                    "step_ratio": results[True]["step_mean_s"] / results[False]["step_mean_s"],
                    "run_ratio": results[True]["run_s"] / results[False]["run_s"],
                    "step_cpu_ratio": results[True]["step_cpu_mean_s"] / results[False]["step_cpu_mean_s"],
                }
                by_cadence[every].append(pair)
                print(f"pair {i}, every {every}: step ratio {pair['step_ratio']:.3f} (CPU time {pair['step_cpu_ratio']:.3f}, "
                      f"attributed {results[True]['attributed_step_ratio']:.3f}), run ratio {pair['run_ratio']:.3f} "
                      f"(plain step {results[False]['step_mean_s'] * 1e3:.0f} ms, in callback "
                      f"{results[True]['in_callback_per_step_s'] * 1e3:.0f} ms, writer CPU "
                      f"{results[True]['writer_thread_cpu_per_step_s'] * 1e3:.0f} ms per step)", flush=True)

    def summary(pairs: list[dict]) -> dict[str, object]:
        return {
            "step_ratio_median": statistics.median(p["step_ratio"] for p in pairs),
            "run_ratio_median": statistics.median(p["run_ratio"] for p in pairs),
            "step_cpu_ratio_median": statistics.median(p["step_cpu_ratio"] for p in pairs),
            "attributed_step_ratio_median": statistics.median(p["monitored"]["attributed_step_ratio"] for p in pairs),
            "plain_step_s_median": statistics.median(p["plain"]["step_mean_s"] for p in pairs),
            "in_callback_per_step_s_median": statistics.median(p["monitored"]["in_callback_per_step_s"] for p in pairs),
            "writer_thread_cpu_per_step_s_median": statistics.median(
                p["monitored"]["writer_thread_cpu_per_step_s"] for p in pairs
            ),
            "pairs": pairs,
        }

    report = {
        "benchmark": "HF Trainer step time, CompassTrainerCallback (snapshot every step) vs none",
        "machine": machine(options.device),
        "model": f"LlamaForCausalLM, {SHAPE['layers']} layers, hidden {SHAPE['hidden']}, intermediate {SHAPE['intermediate']}, "
        f"vocab {VOCAB}, random init",
        "monitored_linear_weights": linear,
        "batch": f"{options.batch} x {SEQ} tokens, AdamW, " + ("bf16 mixed precision (fp32 masters)" if cuda else "fp32"),
        "steps_per_run": options.steps,
        "warmup_steps_excluded": WARMUP,
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "by_every_n_steps": {str(every): summary(pairs) for every, pairs in by_cadence.items()},
        "one_snapshot": one_snapshot,
        "goal": "step_ratio_median <= 1.10 with a snapshot every step (every_n_steps=1)",
        "note": (
            "runs alternate in one process on a shared 2-core machine whose load from other processes can swing between "
            "runs (see load_average_before_after and the plain step times per pair); the side-by-side ratios "
            "(step_ratio, run_ratio, step_cpu_ratio) then measure that load as much as the monitor. "
            "attributed_step_ratio is measured inside each monitored run (time the training thread spent in the "
            "monitor's callbacks vs the step time) and does not depend on the load; it leaves out the store writer "
            "thread's CPU (reported separately) and the Trainer's own logging work at forced log steps"
        ),
    }
    first = report["by_every_n_steps"][str(options.every[0])]
    report["goal_met"] = options.every[0] == 1 and first["step_ratio_median"] <= 1.10
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    for every, result in report["by_every_n_steps"].items():
        print(
            f"every {every}: median step ratio {result['step_ratio_median']:.3f} "
            f"(attributed {result['attributed_step_ratio_median']:.3f}), run ratio {result['run_ratio_median']:.3f}"
        )
    print(f"one snapshot: {json.dumps(report['one_snapshot'])}")
    print(f"-> {options.out}")


if __name__ == "__main__":
    main()
