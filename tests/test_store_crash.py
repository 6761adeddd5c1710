"""kill -9 of a writing process at random moments: the store always opens, every committed
snapshot is intact (checked against deterministic masks), and none is partial.

One helper process imports the package once (before zarr starts any thread) and
forks a fresh writer per trial; the writer creates a store, appends, maybe
finalizes, reopens it to resume with a truncation, appends other masks and
finalizes, logging each commit to a pipe. The helper SIGKILLs it after a random
delay. The test then checks every store against the plan.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from compass_monitor.store import RunWriter, open_run
from store_stream import block_counts, masks, record

TRIALS = 24
KEY_INTERVAL = 4
FIRST, SECOND = 8, 8  # snapshots before and after the resume


def plan(trial: int) -> dict:
    """The deterministic life of trial ``trial``'s store; ``commits`` lists each commit's (generation, snapshots, status)."""
    finalize_first = trial % 2 == 0
    keep = FIRST - 2 - trial % 4  # the resume drops 2-5 snapshots
    commits = [(0, 0, "running"), (0, 0, "running")]  # create, write_base
    commits += [(0, k, "running") for k in range(1, FIRST + 1)]
    if finalize_first:
        commits.append((0, FIRST, "finished"))
    commits.append((1, keep, "running"))
    commits += [(1, keep + j, "running") for j in range(1, SECOND + 1)]
    commits.append((1, keep + SECOND, "finished"))
    return {"finalize_first": finalize_first, "keep": keep, "commits": commits}


def expected_masks(trial: int, generation: int, t: int, keep: int, first, second):
    if generation == 0 or t < keep:
        return first[t], 10 * (t + 1)
    return second[t - keep], 10 * (t + 1) + 5


WORKER = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    sys.path.insert(0, {tests!r})
    from store_stream import masks, record, specs, write_base
    from test_store_crash import FIRST, SECOND, KEY_INTERVAL, plan
    from compass_monitor.store.writer import RunWriter

    def life(path, trial, out):
        info = plan(trial)
        first, second = masks(trial, FIRST), masks(10_000 + trial, SECOND)
        log = lambda: os.write(out, b"c\\n")
        w = RunWriter.create(path, params=specs(), attributes={{}}, key_interval=KEY_INTERVAL); log()
        write_base(w); log()
        os.write(out, b"ready\\n")
        for t in range(FIRST):
            w.append(record(10 * (t + 1), first[t], first[t - 1] if t else None)); log()
        if info["finalize_first"]:
            w.finalize(); log()
        w = RunWriter.open_existing(path)
        keep = info["keep"]
        w.resume(keep, event={{"step": 10 * keep}}); log()
        for j in range(SECOND):
            w.append(record(10 * (keep + j + 1) + 5, second[j], second[j - 1] if j else first[keep - 1])); log()
        w.finalize(); log()

    base, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    # Kill moments are drawn over one whole life as long as it takes on this machine (timed once,
    # unkilled), so that kills land in every phase however fast the writer is.
    read, write = os.pipe()
    start = time.perf_counter()
    life(os.path.join(base, "timing"), 0, write)
    os.close(read); os.close(write)
    horizon = 1.1 * (time.perf_counter() - start)
    results = []
    for trial in range(trials):
        path = os.path.join(base, f"t{{trial:02d}}")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                life(path, trial, write)
                os._exit(0)
            except BaseException:
                import traceback; traceback.print_exc()
                os._exit(3)
        os.close(write)
        reader = os.fdopen(read, "rb", buffering=0)
        lines = []
        while True:
            line = reader.readline()
            if not line:
                break
            lines.append(line)
            if line == b"ready\\n":
                break
        delay = rng.uniform(0.0, horizon)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        lines += reader.read().splitlines(keepends=True)
        reader.close()
        commits = sum(1 for l in lines if l == b"c\\n")
        results.append({{"trial": trial, "path": path, "logged": commits, "delay": delay,
                        "killed": os.WIFSIGNALED(status), "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}})
    print(json.dumps(results))
    """
)


def test_kill_9_at_random_moments(tmp_path, rng):
    tests_dir = str(Path(__file__).parent)
    seed = int(rng.integers(1 << 30))
    out = subprocess.run(
        [sys.executable, "-c", WORKER.format(tests=tests_dir), str(tmp_path), str(TRIALS), str(seed)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == TRIALS
    phases = {"appending": 0, "finalized or resumed": 0, "done": 0}
    for res in results:
        trial = res["trial"]
        assert res["exit"] in (None, 0), f"trial {trial}: the writer failed on its own:\n{out.stderr[-3000:]}"
        info = plan(trial)
        run = open_run(res["path"])  # always opens
        state = (int(run.commit.get("generation", 0)), run.num_snapshots, run.status)
        # The store shows the last logged commit, or the one after it (committed, killed before logging).
        logged = res["logged"] - 1
        candidates = [i for i, c in enumerate(info["commits"]) if c == state]
        assert any(logged <= i <= logged + 1 for i in candidates), (trial, state, logged, info["commits"][logged : logged + 2])
        index = max(i for i in candidates if logged <= i <= logged + 1)
        phases["done" if index == len(info["commits"]) - 1 else "appending" if index <= FIRST + 1 else "finalized or resumed"] += 1
        first, second = masks(trial, FIRST), masks(10_000 + trial, SECOND)
        generation, count, _ = state
        steps = run.steps.tolist()
        assert len(steps) == count
        for t in range(count):
            current, step = expected_masks(trial, generation, t, info["keep"], first, second)
            assert steps[t] == step, (trial, t)
            for p in run.params:
                np.testing.assert_array_equal(run.mask(p, t), current[p.index], err_msg=f"trial {trial} snapshot {t} {p.name}")
        if count:
            last, _ = expected_masks(trial, generation, count - 1, info["keep"], first, second)
            for p in run.params:
                rows, cols = run.preview_edges(p)
                np.testing.assert_array_equal(run.preview_counts(p, -1), block_counts(last[p.index], rows, cols))
                np.testing.assert_array_equal(run.row_counts(p)[-1], last[p.index].sum(axis=1))
                assert run.count("changed")[-1, p.index] == last[p.index].sum()
        # A killed store can be continued: resume at its last commit and append one more snapshot.
        writer = RunWriter.open_existing(res["path"])
        writer.resume(count, event={"step": -1})
        previous = expected_masks(trial, generation, count - 1, info["keep"], first, second)[0] if count else None
        nxt = masks(20_000 + trial, 1)[0]
        writer.append(record(10_000, nxt, previous))
        writer.finalize()
        again = open_run(res["path"])
        assert again.num_snapshots == count + 1 and again.status == "finished"
        for p in again.params:
            np.testing.assert_array_equal(again.mask(p, count), nxt[p.index])
    # The random delays must have hit the store in more than one phase of its life.
    assert phases["appending"] > 0 and phases["finalized or resumed"] + phases["done"] > 0, phases
