"""One writer per run store, in real processes: two monitors that create (or resume) the same run
at the same moment never both write; the other gets a one-line refusal naming the writer.

Two long-lived worker processes (torch imported once each) receive the same command with a
start time and begin together, to the millisecond; each trial is one tiny model, a few steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from compass_monitor.store import StoreLockedError, open_run
from compass_monitor.store.schema import LOCK_FILE

CREATE_TRIALS = 20
RESUME_TRIALS = 10
STEPS = 4

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from torch import nn
    from compass_monitor import MonitorConfig
    from compass_monitor.integrations.pytorch import watch

    WIDTH = int(sys.argv[1])  # the two workers watch models of different sizes

    def model_and_optimizer(seed, width):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(width, 12), nn.ReLU(), nn.Linear(12, 6))
        return model, torch.optim.SGD(model.parameters(), lr=0.05)

    def train(model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, model[0].in_features)).pow(2).mean().backward()
            optimizer.step()

    config = MonitorConfig(every_n_steps=1, principal_rank=2, writer_queue=0)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["do"] == "prepare":  # a run killed after some steps, and the model state to resume it
            model, optimizer = model_and_optimizer(0, WIDTH)
            monitor = watch(model, optimizer, cmd["path"], config=config)
            train(model, optimizer, cmd["steps"])
            torch.save({"model": model.state_dict(), "step": monitor.step}, cmd["state"])
            os._exit(0)  # no close(): the run stays 'running' with a dead writer
        width = cmd.get("width", WIDTH)
        model, optimizer = model_and_optimizer(cmd["seed"], width)
        if cmd["do"] == "resume":
            model.load_state_dict(torch.load(cmd["state"])["model"])
        while time.time() < cmd["start"]:
            pass
        try:
            monitor = watch(model, optimizer, cmd["path"], config=config, resume=cmd["do"] == "resume")
        except Exception as exc:
            print(json.dumps({"ok": False, "type": type(exc).__name__, "error": str(exc)}), flush=True)
            continue
        train(model, optimizer, cmd["steps"])
        print(json.dumps({"ok": True, "enabled": monitor.enabled, "reason": monitor.disabled_reason,
                          "pid": os.getpid(), "width": width}), flush=True)
        assert json.loads(sys.stdin.readline())["do"] == "close"  # the test waits for the other side first
        monitor.close()
        print(json.dumps({"closed": True}), flush=True)
    """
)


class Worker:
    def __init__(self, width: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(width)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def send(self, cmd: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"worker exited with {self.proc.poll()}"
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def workers():
    pair = [Worker(16), Worker(24)]
    yield pair
    for w in pair:
        w.stop()


def verify(path: Path, widths: set[int]) -> int:
    """The store reads whole: every mask decodes and matches its stored count; returns the first layer's width."""
    run = open_run(path)
    assert run.status == "finished", run.status
    assert run.num_snapshots == run.steps.size
    width = run.params[0].shape[1]
    assert width in widths
    counts = run.count("changed")
    for p in run.params:
        for t in range(run.num_snapshots):
            assert int(run.mask(p, t).sum()) == counts[t, p.index], (path, p.name, t)
    return width


def run_pair(workers, cmds: list[dict]) -> list[dict]:
    """Start both commands at the same moment; the writer that got the store keeps it open until
    the other has answered (so the two always overlap), then closes it."""
    start = time.time() + 0.3
    for w, cmd in zip(workers, cmds):
        w.send({**cmd, "start": start})
    results = [w.result() for w in workers]
    for w, r in zip(workers, results):
        if r["ok"]:
            w.send({"do": "close"})
            assert w.result() == {"closed": True}
    return results


def check_refusal(result: dict) -> None:
    assert not result["ok"]
    message = result["error"]
    assert "\n" not in message
    if result["type"] == "StoreLockedError":
        assert "another writer holds this run store" in message and "pid " in message and "host " in message, message
    else:  # a resumer that read the store after the winner had taken it over
        assert result["type"] == "ResumeError" and "is still writing it" in message, result


@pytest.mark.slow
def test_two_simultaneous_creators(tmp_path, workers):
    winners = []
    for trial in range(CREATE_TRIALS):
        path = tmp_path / f"run{trial:02d}"
        results = run_pair(workers, [{"do": "create", "path": str(path), "seed": trial, "steps": STEPS}] * 2)
        ok = [r for r in results if r["ok"]]
        assert len(ok) == 1, (trial, results)
        assert ok[0]["enabled"], ok[0]
        check_refusal(next(r for r in results if not r["ok"]))
        width = verify(path, {16, 24})
        assert width == ok[0]["width"]  # the winner's model, nothing of the other
        assert open_run(path).num_snapshots == STEPS
        winners.append(width)
    print("winners by model width:", {w: winners.count(w) for w in set(winners)})


@pytest.mark.slow
def test_two_simultaneous_resumers(tmp_path, workers):
    template, state = tmp_path / "killed", tmp_path / "state.pt"
    prep = Worker(16)
    prep.send({"do": "prepare", "path": str(template), "state": str(state), "steps": STEPS})
    assert prep.proc.wait(timeout=120) == 0
    assert open_run(template).status == "running" and open_run(template).is_stale
    for trial in range(RESUME_TRIALS):
        path = tmp_path / f"run{trial:02d}"
        shutil.copytree(template, path)
        # Both resume the killed run's model (width 16).
        cmd = {"do": "resume", "path": str(path), "state": str(state), "seed": 0, "steps": STEPS, "width": 16}
        results = run_pair(workers, [cmd, cmd])
        ok = [r for r in results if r["ok"]]
        assert len(ok) == 1, (trial, results)
        assert ok[0]["enabled"], ok[0]
        check_refusal(next(r for r in results if not r["ok"]))
        run = open_run(path)
        resumed = [e for e in run.history if e.get("event") == "resumed"]
        assert len(resumed) == len(ok) == 1, (trial, results, resumed)
        verify(path, {16})
        assert run.num_snapshots == 2 * STEPS


def test_lock_refusal_names_the_writer(tmp_path):
    from compass_monitor.store.lock import WriterLock

    root = tmp_path / "run"
    root.mkdir()
    code = (
        "import sys, time; from compass_monitor.store.lock import WriterLock;"
        f"lock = WriterLock.acquire({str(root)!r}, purpose='creating'); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"pid {holder.pid} on host .*creating since"):
            WriterLock.acquire(root, purpose="resuming")
    finally:
        holder.kill()
        holder.wait()
    # kill -9 released it: the lock file stays, and is free.
    assert (root / LOCK_FILE).is_file()
    lock = WriterLock.acquire(root, purpose="resuming")
    assert json.loads((root / LOCK_FILE).read_text())["purpose"] == "resuming"
    lock.release()


def test_in_process_takeover_revokes_the_old_writer(tmp_path):
    from compass_monitor.store import RunWriter, StoreError
    from store_stream import masks, record, specs, write_base

    first = RunWriter.create(tmp_path / "run", params=specs(), attributes={}, key_interval=4)
    write_base(first)
    stream = masks(3, 2)
    first.append(record(1, stream[0], None))
    with pytest.raises(StoreLockedError, match="this process already writes"):
        from compass_monitor.store.lock import WriterLock

        WriterLock.acquire(tmp_path / "run", purpose="creating")
    second = RunWriter.open_existing(tmp_path / "run")  # a resume in this process takes it over
    with pytest.raises(StoreError, match="took it over"):
        first.append(record(2, stream[1], stream[0]))
    second.resume(1, event={"step": 1})
    second.append(record(2, stream[1], stream[0]))
    second.finalize()
    assert not second.owns_store
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [1, 2] and run.status == "finished"


def test_failed_creation_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    import errno

    from compass_monitor.store import RunWriter, StoreError
    from store_stream import specs

    def disk_full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunWriter, "_create_arrays", disk_full)
    with pytest.raises(StoreError, match=r"cannot create the run store at .*: No space left on device \(free disk space"):
        RunWriter.create(tmp_path / "run", params=specs(), attributes={})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # the free lock only
    monkeypatch.undo()
    RunWriter.create(tmp_path / "run", params=specs(), attributes={}).finalize()  # the folder counts as empty
    assert open_run(tmp_path / "run").status == "finished"


KILL_CREATION = textwrap.dedent(
    """
    import os, random, signal, sys, time
    sys.path.insert(0, {tests!r})
    import numpy as np
    from store_stream import specs, write_base, SHAPES
    from compass_monitor.store.writer import RunWriter

    def create(path):
        w = RunWriter.create(path, params=specs(), attributes={{}}, key_interval=4)
        w.write_base(fingerprints=np.zeros((len(SHAPES), 2), dtype=np.int64),
                     class_counts=np.zeros((len(SHAPES), 4, 512), dtype=np.int64),
                     reference_packed=[np.zeros((3, (m * n + 7) // 8), dtype=np.uint8) for m, n in SHAPES],
                     base_codes=[np.ones((m, n), dtype=np.int16) for m, n in SHAPES])

    base, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    start = time.perf_counter(); create(os.path.join(base, "timing")); horizon = 1.2 * (time.perf_counter() - start)
    for trial in range(trials):
        pid = os.fork()
        if pid == 0:
            create(os.path.join(base, f"t{{trial:02d}}"))
            os._exit(0)
        time.sleep(rng.uniform(0.0, horizon))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print("done")
    """
)


def test_kill_9_during_creation_leaves_nothing_or_a_resumable_store(tmp_path, rng):
    """A creation killed at any moment leaves a folder that a new run accepts, or a store that resumes."""
    from compass_monitor.store import RunWriter
    from store_stream import specs

    trials = 16
    tests_dir = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", KILL_CREATION.format(tests=tests_dir), str(tmp_path), str(trials), str(int(rng.integers(1 << 30)))],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    outcomes = {"created anew": 0, "resumable": 0}
    for trial in range(trials):
        path = tmp_path / f"t{trial:02d}"
        commit = json.loads((path / "commit.json").read_text()) if (path / "commit.json").exists() else {}
        if commit.get("base_weights"):
            writer = RunWriter.open_existing(path)
            writer.resume(0, event={"step": 0})
            writer.finalize()
            outcomes["resumable"] += 1
        else:
            RunWriter.create(path, params=specs(), attributes={}).finalize()
            outcomes["created anew"] += 1
        assert open_run(path).status == "finished"
    assert outcomes["created anew"] > 0, outcomes  # the kills landed inside creations
