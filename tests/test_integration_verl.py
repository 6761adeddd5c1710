"""The verl plugin: entry point, hooking verl's real TrainingWorker, monitoring its FSDP2 engine's module.

verl 0.9 pins transformers<5.11, which conflicts with the transformers this
test environment uses, so the tests that import verl skip in the main
environment; ``make test`` runs this file again in ``.venv-verl`` (``pip install
'compass-monitor[verl]'``, CPU is enough: verl's real classes, FSDP2 on a gloo
process group, no GPU and no Ray cluster), with ``COMPASS_REQUIRE_VERL=1`` so
that a missing verl fails there instead of skipping. The entry-point test runs
everywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch


PLUGIN = "compass_monitor.integrations.verl_plugin"


def test_entry_point_is_registered():
    points = importlib.metadata.entry_points(group="verl.plugins")
    assert any(point.value == PLUGIN for point in points), "reinstall compass-monitor (pip install -e .) to register it"


# `make test` runs this file a second time in .venv-verl with COMPASS_REQUIRE_VERL=1, where these must run.
needs_verl = pytest.mark.skipif(
    importlib.util.find_spec("verl") is None and not os.environ.get("COMPASS_REQUIRE_VERL"),
    reason="verl is not installed here (verl 0.9 pins transformers<5.11); `make test` runs these in .venv-verl",
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COMPASS_MONITOR_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300)


@needs_verl
def test_verl_loads_the_plugin_and_it_hooks_the_training_worker(tmp_path):
    """``import verl`` loads the entry point; importing the workers then patches the real TrainingWorker."""
    code = """
        import sys
        import verl
        assert "compass_monitor.integrations.verl_plugin" in sys.modules
        from verl.workers import engine_workers
        from verl.single_controller.base.decorator import MAGIC_ATTR
        worker = engine_workers.TrainingWorker
        print("patched", getattr(worker, "_compass_patched", False))
        for name in ("train_mini_batch", "save_checkpoint", "load_checkpoint"):
            method = getattr(worker, name)
            # verl dispatches by the attribute its @register put on the method: it must survive the wrapper
            assert getattr(method, MAGIC_ATTR) == getattr(method.__wrapped__, MAGIC_ATTR), name
        print("dispatch kept")
    """
    on = _python(code, COMPASS_MONITOR_RUN_DIR=str(tmp_path / "run"))
    assert on.returncode == 0, on.stderr[-3000:]
    assert "patched True" in on.stdout and "dispatch kept" in on.stdout
    off = _python(
        """
        import verl
        from verl.workers import engine_workers
        print("patched", getattr(engine_workers.TrainingWorker, "_compass_patched", False))
        """
    )
    assert off.returncode == 0, off.stderr[-3000:]
    assert "patched False" in off.stdout  # without COMPASS_MONITOR_RUN_DIR the plugin leaves verl alone


@needs_verl
@pytest.mark.parametrize("world_size", [1, 2])
def test_plugin_on_verls_fsdp_engine_with_checkpoint_resume(tmp_path, world_size):
    """verl's real TrainingWorker + FSDP2 engine on the CPU (examples/verl_cpu.py), monitored by the plugin.

    Phase 1: three updates of two mini-batches (optimizer steps 1..6), a checkpoint after the second
    update (step 4), then the process exits without closing (a crash). Phase 2: a new process loads
    the checkpoint and runs two more updates (steps 5..8): the store drops the crashed run's step 6,
    redoes it, and ends at step 8, measured against the original W0. The plugin reads the weights from the
    engine's module (FSDP2: one monitor per rank). ``world_size`` 2: FSDP2 shards the actor over two gloo ranks.
    """
    import json

    from safetensors.torch import load_file

    from _tiny_lm import tiny_llama, tiny_tokenizer
    from compass_monitor import open_run
    from compass_monitor.aggregates import everything_linear, group_stats, scalars

    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "verl_cpu.py")
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt" / "actor"
    ckpt.mkdir(parents=True)
    seen = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPASS_MONITOR_", "VERL_"))}
    for phase in ("first", "resume"):
        command = [sys.executable, script, str(run_dir), "--model", str(tmp_path / "model"), "--ckpt", str(ckpt),
                   "--phase", phase, "--world-size", str(world_size)]
        ranks = [
            subprocess.Popen([*command, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for r in range(world_size)
        ]
        outputs = [p.communicate(timeout=600) for p in ranks]
        for p, (stdout, stderr) in zip(ranks, outputs):
            assert p.returncode == 0, stderr[-4000:]
        per_rank = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
        assert all(r["patched"] for r in per_rank)
        assert len({json.dumps(r["metrics"]) for r in per_rank}) == 1  # every rank saw the same snapshots
        seen[phase] = per_rank[0]
    if world_size > 1:
        assert seen["resume"]["local_rows"]["model.layers.0.mlp.up_proj.weight"] == 64 // world_size  # really sharded
    assert seen["first"]["monitor_step"] == 6 and seen["resume"]["monitor_step"] == 8
    assert seen["first"]["monitor_sharding"] == seen["resume"]["monitor_sharding"] == "fsdp2"
    assert json.loads((ckpt / "compass_monitor.json").read_text())["step"] == 4

    run = open_run(run_dir)
    assert run.status == "finished"
    assert run.steps.tolist() == [2, 4, 6, 8]
    resumed = [e for e in run.commit["history"] if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 4 and resumed[0]["dropped"] == 1
    # the redone step 6 saw the same data and weights as the crashed run's step 6
    assert seen["resume"]["metrics"][0] == seen["first"]["metrics"][2]
    # scalars that reached verl's metrics equal the store's
    stats = group_stats(run, everything_linear)
    logged = seen["first"]["metrics"][:2] + seen["resume"]["metrics"]
    for index, metrics in enumerate(logged):
        for key, value in scalars(stats, index=index).items():
            assert metrics[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    # the last mask is the final weights against the original W0 (not the checkpoint's weights)
    initial = load_file(tmp_path / "model" / "model.safetensors")
    final = torch.load(tmp_path / "ckpt" / "final_bf16.pt")
    for p in run.params:
        direct = (final[p.name] != initial[p.name].to(torch.bfloat16)).numpy()
        assert (run.mask(p.name, -1) == direct).all(), p.name
