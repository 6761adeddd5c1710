"""Post hoc with W0 reread from the base checkpoint: nothing of the base held, the same store as holding it.

``diff_checkpoints`` by default gives the probe a second cursor on the base
(``ShardLayout.base_values``): the probe keeps no W0 codes and no masks in
memory (they wait in an anonymous spill file), and rereads W0 whenever it
measures a matrix or the spectral diagnostics need it. ``hold_base=True`` is the
live monitor's layout. The two stores must be equal array by array, over
several checkpoints (the previous mask goes through the spill file) and with
the spectra on (W0 reread for the SVDs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compass_monitor import CompassMonitor  # noqa: E402
from compass_monitor.checkpoints import diff_checkpoints, resolve_steps  # noqa: E402
from compass_monitor.checkpoints.layout import CheckpointCursor, build_layout  # noqa: E402
from compass_monitor.checkpoints.series import check_series, open_checkpoint  # noqa: E402
from compass_monitor.config import MonitorConfig  # noqa: E402
from compass_monitor.shard_geometry import aligned_nbytes  # noqa: E402
from compass_monitor.store import open_run  # noqa: E402

STEPS = (1, 2, 3)
CONFIG = MonitorConfig(principal_rank=4, spectral_every=1, spectral_k=4, snapshot_on_close=False)


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A tiny GPT-2 (Conv1D, fused c_attn: stored tensors are not the measured matrices) and three Adam checkpoints."""
    root = tmp_path_factory.mktemp("series")
    torch.manual_seed(0)
    model = gpt2().train()
    model.save_pretrained(root / "base")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    for step in STEPS:
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        model.save_pretrained(root / f"checkpoint-{step}")
    return root


def test_the_probe_holds_nothing_of_the_base(series, tmp_path):
    base = open_checkpoint(series / "base")
    plan = check_series(base, [open_checkpoint(series / "checkpoint-1")], CONFIG)
    cursor = CheckpointCursor(base, views=plan.views)
    layout = build_layout(plan.specs, cursor, base=CheckpointCursor(base, views=plan.views))
    monitor = CompassMonitor.from_layout(layout, tmp_path / "run", config=CONFIG)
    states = monitor.probe.states
    assert len(states) == len(plan.specs) == 12  # 2 layers x (q, k, v of c_attn, o, up, down)
    groups = monitor.probe._base_groups()  # W0 reread: the capture's working set is bounded by the largest matrix
    assert sorted(p for g in groups for p in g) == list(range(12)) and len(groups) > 1
    assert max(sum(states[p].numel for p in g) for g in groups) == max(s.numel for s in states)
    assert all(s.offload is not None for s in states)
    held = lambda: sum(t.untyped_storage().nbytes() for s in states for t in (s.base_bits, s.reference_packed, s.previous_packed))  # noqa: E731
    assert held() == 0  # storage, not numel: an empty view would keep W0 alive
    # 3 reference masks + the previous mask, 1 bit per weight each, on disk
    assert monitor.probe.spill.nbytes == sum(4 * aligned_nbytes(0, s.numel) for s in states)
    cursor.move_to(open_checkpoint(series / "checkpoint-1"))
    monitor.snapshot(1)
    assert held() == 0  # dropped after measuring
    monitor.close()
    assert not [p.name for p in (tmp_path / "run").rglob("*") if "spill" in p.name]  # the spill file has no name
    assert not [p.name for p in tmp_path.iterdir() if p.name != "run"]
    run = open_run(tmp_path / "run")
    assert run.status == "finished" and run.steps.tolist() == [1]


def test_reread_store_equals_held_store(series, tmp_path):
    refs = resolve_steps([series / f"checkpoint-{s}" for s in STEPS])
    diff_checkpoints(series / "base", refs, tmp_path / "reread", config=CONFIG, progress=False, device="cpu")
    diff_checkpoints(series / "base", refs, tmp_path / "held", config=CONFIG, progress=False, device="cpu", hold_base=True)
    a, b = open_run(tmp_path / "reread"), open_run(tmp_path / "held")
    assert a.steps.tolist() == b.steps.tolist() == list(STEPS)
    assert [p.to_record() for p in a.params] == [p.to_record() for p in b.params]
    for name in ("counts", "null_overlap", "base_fingerprint", "base_class_counts", "spectral_metrics"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.counts[1:, :, 3] > 0).any()  # flips vs the previous snapshot: the spilled previous mask was used
    for p in a.params:
        np.testing.assert_array_equal(a.base_codes(p), b.base_codes(p))
        for which in ("principal", "low", "principal_not_low"):
            np.testing.assert_array_equal(a.reference_mask(p, which), b.reference_mask(p, which))
        for t in range(len(STEPS)):
            np.testing.assert_array_equal(a.mask(p, t), b.mask(p, t))
            np.testing.assert_array_equal(a.row_counts(p)[t], b.row_counts(p)[t])
    np.testing.assert_array_equal(a.spectral_angles, b.spectral_angles)
    np.testing.assert_array_equal(a.spectral_singular_values, b.spectral_singular_values)


def test_reading_codes_inside_resident_leaves_the_state_resident(series, tmp_path):
    """The store writer's thread reads W0 codes while the training thread measures the same matrix.

    Reading codes must not touch the state: before the fix the reader entered ``resident``
    itself and its exit emptied the measuring thread's W0 (a Qwen2-shaped 6-layer diff
    failed with "cannot reshape array of size 0 into shape (8960,1536)").
    """
    from compass_monitor.matrix_probe import resident

    base = open_checkpoint(series / "base")
    plan = check_series(base, [open_checkpoint(series / "checkpoint-1")], CONFIG)
    layout = build_layout(plan.specs, CheckpointCursor(base, views=plan.views), base=CheckpointCursor(base, views=plan.views))
    monitor = CompassMonitor.from_layout(layout, tmp_path / "run", config=CONFIG)
    probe = monitor.probe
    codes = probe.gather_base_codes()
    state = probe.states[0]
    with resident(state):
        held = state.base_bits.clone()
        read = codes[0]  # what the writer thread does meanwhile
        assert state.base_bits.numel() == state.numel == read.size
        np.testing.assert_array_equal(state.base_bits.numpy(), held.numpy())
        assert state.reference_packed.shape[1] == aligned_nbytes(0, state.numel)
    np.testing.assert_array_equal(read, held.numpy())
    assert probe.whole_matrix(0, base=True).numel() == state.numel
    assert state.base_bits.untyped_storage().nbytes() == 0  # still dropped after the block
    monitor.close()

