"""Multi-process tests of the sharded monitor: real gloo process groups on the CPU.

A deterministic training (``dist_helpers``: the same data on every rank, only
rank 0's gradient counts, exact reductions, an optimizer of single-rounding
elementwise ops) gives bit-identical weights on 1, 2 and 3 ranks. The run
store written by the sharded monitor must then be *identical* to that of a
single-process run (every array: masks, frames, counts, null overlaps,
row/column profiles, previews, reference masks, class counts, fingerprints,
W0 codes), for:

* FSDP2 ``fully_shard`` on 2 and 3 ranks (row counts 29, 13, 7, 2 do not
  divide; on 3 ranks the 2-row matrix and 2-element bias leave rank 2 empty);
* FSDP1 with ``use_orig_params`` False (FlatParameter) and True, on 2 and 3
  ranks (flat shards end mid-row; some parameters are not on a rank at all);
* HSDP (a 2 x 1 mesh: two replicas, only one contributes), and FSDP1's
  ``NO_SHARD`` and ``HYBRID_SHARD`` (2 x 1 mesh) the same way;
* a run started on 2 ranks and resumed from a checkpoint on 3.

Each world size runs all its scenarios in one process group (ranks are forked
from a fork server that imported torch once), so the whole module takes
about half a minute on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import dist_helpers as H
from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.integrations.pytorch import attach_optimizer

CONFIG = dict(every_n_steps=2, principal_rank=3, alpha=0.5, include_biases=True, include_norms=True)
SPECTRAL = dict(spectral_every=2, spectral_k=2)  # spectral diagnostics at the 2nd and 4th snapshot
STEPS = 7  # snapshots at 2, 4, 6 and 7 (the last at close)
RESUME_AT, RESUME_TOTAL = 4, 8


# ----------------------------------------------------------------------------- worker side


def _build(kind: str):
    model = H.make_model()
    if kind == "fsdp2":
        return H.shard_fsdp2(model)
    if kind == "hsdp":
        return H.shard_fsdp2(model, mesh_shape=(2, 1))
    if kind == "fsdp1":
        return H.shard_fsdp1(model, use_orig_params=False)
    if kind == "fsdp1_orig":
        return H.shard_fsdp1(model, use_orig_params=True)
    if kind == "fsdp1_noshard":
        return H.shard_fsdp1(model, use_orig_params=False, strategy="NO_SHARD")
    if kind == "fsdp1_hybrid":
        return H.shard_fsdp1(model, use_orig_params=True, strategy="HYBRID_SHARD")
    raise ValueError(kind)


def _scenario(
    rank: int, kind: str, path: Path, *, count: H.CollectiveCounter | None = None, skip_at: int | None = None, spectral: bool = False
) -> dict:
    model = _build(kind)
    extra = SPECTRAL if spectral else {}
    config = MonitorConfig(**CONFIG, **extra, when_queue_full="skip") if skip_at else MonitorConfig(**CONFIG, **extra)
    monitor = CompassMonitor(model, path, config=config)
    if skip_at and rank == 0:  # only the writer sees its queue full; every rank must skip with it
        monitor.writer.full = lambda: monitor.step == skip_at
    per_snapshot: list[list[tuple[str, str, int]]] = []
    if count is not None:
        original = monitor._snapshot

        def counted(step: int) -> None:
            count.calls.clear()
            count.active = True
            try:
                original(step)
            finally:
                count.active = False
                per_snapshot.append(list(count.calls))

        monitor._snapshot = counted
    optimizer = H.ExactAdam(model.parameters())
    attach_optimizer(monitor, optimizer)
    H.train_steps(model, optimizer, H.batches(STEPS), rank=rank)
    scalars = monitor.latest_scalars()
    monitor.close()
    weights = {k: v.numpy() for k, v in H.full_state(model).items()}
    core = monitor.probe
    return {
        "type": type(monitor).__name__,
        "is_sharded": monitor.world_size > 1 and monitor.probe.layout.kind != "plain",
        "disabled": monitor.disabled_reason,
        "scalars": scalars,
        "weights": weights if rank == 0 else None,
        "snapshot_calls": per_snapshot,
        "comm_snapshot": [(r.op, r.dtype, r.nbytes) for r in core.comm.records if r.phase == "snapshot"],
        "payload_bytes": {r: core.geometry.payload_bytes(r) for r in core.members},
        "local_numel": sum(s.numel for s in core.states),
        "local_param_bytes": sum(s.shard.numel * s.shard.local().element_size() for s in core.states if s.shard.numel),
        "layouts": sorted({s.layout for s in core.layout.shards}),
        "ranges": [(s.spec.name, s.start, s.numel, s.contributes) for s in core.layout.shards],
        "shapes": [s.spec.shape for s in core.layout.shards],
        "num_params": len(core.states),
    }


def _failure(rank: int, path: Path) -> dict:
    """Rank 1 fails to measure at the second snapshot: every rank disables itself there; training goes on."""
    from compass_monitor.probe import LocalSnapshot

    model = _build("fsdp2")
    monitor = CompassMonitor(model, path, config=MonitorConfig(**CONFIG))
    optimizer = H.ExactAdam(model.parameters())
    attach_optimizer(monitor, optimizer)
    H.train_steps(model, optimizer, H.batches(3), rank=rank)
    if rank == 1:
        P = len(monitor.specs)
        monitor.probe.measure = lambda: LocalSnapshot(counts=np.zeros((P, 6), np.int64), error="rank 1: injected failure")
    H.train_steps(model, optimizer, H.batches(4)[3:], rank=rank)  # step 4 snapshots
    enabled_after = monitor.enabled
    H.train_steps(model, optimizer, H.batches(3), rank=rank)  # training continues, the monitor stays out
    monitor.close()
    return {"enabled": enabled_after, "reason": monitor.disabled_reason, "step": monitor.step}


def _refusals(rank: int, world: int, root: Path) -> dict:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from compass_monitor.selection import SelectionError
    from compass_monitor.sharding import ShardingError
    from compass_monitor.store.schema import StoreExistsError

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    model[1].weight = nn.Parameter(distribute_tensor(model[1].weight.detach(), mesh, [Shard(1)]))
    try:
        CompassMonitor(model, root / "refused", config=MonitorConfig(principal_rank=2))
        out["shard1"] = None
    except ShardingError as exc:
        out["shard1"] = str(exc)
    try:
        from torch.distributed.tensor.placement_types import _StridedShard

        strided = nn.Sequential(nn.Linear(6, 8))
        strided[0].weight = nn.Parameter(distribute_tensor(strided[0].weight.detach(), mesh, [_StridedShard(0, split_factor=2)]))
        try:
            CompassMonitor(strided, root / "refused_strided", config=MonitorConfig(principal_rank=2))
            out["strided"] = None
        except ShardingError as exc:
            out["strided"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - this torch cannot build a strided shard by hand
        out["strided"] = f"skipped: {exc}"
    fsdp = _build("fsdp2")
    try:
        CompassMonitor(fsdp, root / "nothing", config=MonitorConfig(name_pattern="no_such_layer"))
        out["selection"] = None
    except SelectionError as exc:
        out["selection"] = str(exc)
    CompassMonitor(fsdp, root / "taken", config=MonitorConfig(**CONFIG)).close()
    try:
        CompassMonitor(fsdp, root / "taken", config=MonitorConfig(**CONFIG))
        out["exists"] = None
    except StoreExistsError as exc:
        out["exists"] = str(exc)
    return out


def _resume_first(rank: int, root: Path) -> None:
    """2 ranks: snapshots at 2, 4, 6; a checkpoint at step 4 (weights and optimizer moments)."""
    model = _build("fsdp2")
    monitor = CompassMonitor(model, root / "resume", config=MonitorConfig(**CONFIG))
    optimizer = H.ExactAdam(model.parameters())
    attach_optimizer(monitor, optimizer)
    data = H.batches(RESUME_TOTAL)
    H.train_steps(model, optimizer, data[:RESUME_AT], rank=rank)
    state = monitor.state_dict()
    ckpt = H.checkpoint_fsdp2(model, optimizer)
    if rank == 0:
        torch.save({"model": ckpt, "monitor": state}, root / "ckpt.pt")
    H.train_steps(model, optimizer, data[RESUME_AT:6], rank=rank)  # then the job dies after step 6
    monitor.close()


def _resume_second(rank: int, root: Path) -> dict:
    """3 ranks: continue the 2-rank store from the step-4 checkpoint, train to step 8."""
    model = _build("fsdp2")
    optimizer = H.ExactAdam(model.parameters())
    saved = torch.load(root / "ckpt.pt", weights_only=False)
    H.restore_fsdp2(model, optimizer, saved["model"])
    monitor = CompassMonitor(model, root / "resume", resume=True, resume_step=saved["monitor"]["step"])
    attach_optimizer(monitor, optimizer)
    H.train_steps(model, optimizer, H.batches(RESUME_TOTAL)[RESUME_AT:], rank=rank)
    monitor.close()
    return {"type": type(monitor).__name__, "disabled": monitor.disabled_reason, "world": monitor.world_size}


def _rewind(rank: int, root: Path) -> dict:
    """``load_state_dict``: train to 6, reload the step-4 checkpoint in place, train on to 8."""
    model = _build("fsdp2")
    monitor = CompassMonitor(model, root / "rewind", config=MonitorConfig(**CONFIG))
    optimizer = H.ExactAdam(model.parameters())
    attach_optimizer(monitor, optimizer)
    data = H.batches(RESUME_TOTAL)
    H.train_steps(model, optimizer, data[:RESUME_AT], rank=rank)
    state, ckpt = monitor.state_dict(), H.checkpoint_fsdp2(model, optimizer)
    H.train_steps(model, optimizer, data[RESUME_AT:6], rank=rank)
    H.restore_fsdp2(model, optimizer, ckpt)
    monitor.load_state_dict(state)
    after = (monitor.step, monitor.latest_step)
    H.train_steps(model, optimizer, data[RESUME_AT:], rank=rank)
    monitor.close()
    return {"after_rewind": after, "disabled": monitor.disabled_reason}


def group_two(rank: int, world: int, root: str) -> dict:
    root = Path(root)
    with H.CollectiveCounter() as count:
        out = {"fsdp2": _scenario(rank, "fsdp2", root / "fsdp2_w2", count=count)}
    out["fsdp1"] = _scenario(rank, "fsdp1", root / "fsdp1_w2")
    out["fsdp1_orig"] = _scenario(rank, "fsdp1_orig", root / "fsdp1_orig_w2")
    out["hsdp"] = _scenario(rank, "hsdp", root / "hsdp_w2")
    out["fsdp1_noshard"] = _scenario(rank, "fsdp1_noshard", root / "fsdp1_noshard_w2")
    out["fsdp1_hybrid"] = _scenario(rank, "fsdp1_hybrid", root / "fsdp1_hybrid_w2")
    out["fsdp1_spectral"] = _scenario(rank, "fsdp1", root / "fsdp1_spectral_w2", spectral=True)
    out["failure"] = _failure(rank, root / "failure")
    out["refusals"] = _refusals(rank, world, root)
    out["rewind"] = _rewind(rank, root)
    _resume_first(rank, root)
    return out


def group_three(rank: int, world: int, root: str) -> dict:
    root = Path(root)
    with H.CollectiveCounter() as count:
        out = {"fsdp2": _scenario(rank, "fsdp2", root / "fsdp2_w3", count=count)}
    out["fsdp1"] = _scenario(rank, "fsdp1", root / "fsdp1_w3")
    out["fsdp1_orig"] = _scenario(rank, "fsdp1_orig", root / "fsdp1_orig_w3")
    out["resume"] = _resume_second(rank, root)
    out["skip"] = _scenario(rank, "fsdp2", root / "skip_w3", skip_at=4)
    with H.CollectiveCounter() as count:
        out["fsdp2_spectral"] = _scenario(rank, "fsdp2", root / "fsdp2_spectral_w3", count=count, spectral=True)
    return out


# ----------------------------------------------------------------------------- test side


def _single(path: Path, steps: int, *, skip_at: int | None = None, spectral: bool = False) -> dict[str, np.ndarray]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: identical BLAS results
    try:
        model = H.make_model()
        extra = SPECTRAL if spectral else {}
        config = MonitorConfig(**CONFIG, **extra, when_queue_full="skip") if skip_at else MonitorConfig(**CONFIG, **extra)
        monitor = CompassMonitor(model, path, config=config)
        assert type(monitor) is CompassMonitor
        if skip_at:
            monitor.writer.full = lambda: monitor.step == skip_at
        optimizer = H.ExactAdam(model.parameters())
        attach_optimizer(monitor, optimizer)
        H.train_steps(model, optimizer, H.batches(steps))
        monitor.close()
        return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    finally:
        torch.set_num_threads(before)


def _arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    return {name: obj for name, obj in group.members(max_depth=None) if isinstance(obj, zarr.Array)}


def assert_same_store(expected: Path, got: Path) -> None:
    """Every array and every layout/config attribute equal; the commit's snapshot count, steps, status and gaps too."""
    a, b = zarr.open_group(str(expected), mode="r"), zarr.open_group(str(got), mode="r")
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name, array in arrays_a.items():
        if name == "snapshots/time":
            continue
        other = arrays_b[name]
        assert array.shape == other.shape and array.dtype == other.dtype, name
        np.testing.assert_array_equal(array[...], other[...], err_msg=name)
        assert dict(array.attrs) == dict(other.attrs), name
    for key in ("params", "config", "count_fields", "reference_masks", "methods", "storage", "format", "schema_version"):
        assert a.attrs[key] == b.attrs[key], key
    ca, cb = (json.loads((p / "commit.json").read_text()) for p in (expected, got))
    for key in ("snapshots", "last_step", "status", "gaps", "base_weights", "key_interval"):
        assert ca[key] == cb[key], key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    weights = {"single7": _single(root / "single7", STEPS), "single8": _single(root / "single8", RESUME_TOTAL)}
    _single(root / "single7_skip", STEPS, skip_at=4)
    _single(root / "single7_spectral", STEPS, spectral=True)
    two = H.spawn(group_two, 2, str(root))
    three = H.spawn(group_three, 3, str(root))
    return root, weights, two, three


@pytest.mark.parametrize(
    "world, kind",
    [
        (2, "fsdp2"), (3, "fsdp2"), (2, "fsdp1"), (3, "fsdp1"), (2, "fsdp1_orig"), (3, "fsdp1_orig"), (2, "hsdp"),
        (2, "fsdp1_noshard"), (2, "fsdp1_hybrid"),
    ],
)
def test_store_identical_to_single_process(runs, world, kind):
    root, weights, two, three = runs
    result = (two if world == 2 else three)[0][kind]
    assert result["is_sharded"] and result["disabled"] is None
    # the training itself is bit-identical to the single process
    for name, value in weights["single7"].items():
        np.testing.assert_array_equal(result["weights"][name], value, err_msg=name)
    assert_same_store(root / "single7", root / f"{kind}_w{world}")
    run = open_run(root / f"{kind}_w{world}")
    assert run.steps.tolist() == [2, 4, 6, 7]
    assert open_run(root / "single7").count("changed")[-1].sum() > 0


@pytest.mark.parametrize(("world", "kind"), [(2, "fsdp1"), (3, "fsdp2")])
def test_spectral_diagnostics_equal_a_single_process(runs, world, kind):
    """Each matrix gathered to rank 0 at the spectral cadence: the stored spectra equal a single process's."""
    root, _, two, three = runs
    result = (two if world == 2 else three)[0][f"{kind}_spectral"]
    assert result["is_sharded"] and result["disabled"] is None
    assert_same_store(root / "single7_spectral", root / f"{kind}_spectral_w{world}")
    spectral = open_run(root / f"{kind}_spectral_w{world}").spectral_metrics
    computed = ~np.isnan(spectral[..., 0])
    assert computed.any(axis=1).tolist() == [False, True, False, True]  # snapshots 2 and 4 of 4
    assert (spectral[computed][:, 0] > 0).any()  # some matrix drifted
    if world == 3:  # the weights move only on the spectral snapshots: one gather per matrix there
        calls = three[0][f"{kind}_spectral"]["snapshot_calls"]
        matrices = three[0][f"{kind}_spectral"]["num_params"]
        gathers = [sum(1 for op, *_ in c if op == "gather") for c in calls]
        assert gathers[1] - gathers[0] == matrices and gathers[3] - gathers[2] == matrices


def test_layouts_really_are_sharded(runs):
    _, _, two, three = runs
    fsdp2_three = three[2]["fsdp2"]
    # rank 2 holds no row of the 2-row matrix and no element of its 2-element bias
    empty = {name for name, start, numel, _ in fsdp2_three["ranges"] if numel == 0}
    assert {"squeeze.weight", "squeeze.bias"} <= empty
    # 29 rows on 2 ranks: 15 + 14
    assert dict((n, k) for n, _, k, _ in two[1]["fsdp2"]["ranges"])["layers.0.up_proj.weight"] == 14 * 13
    # FSDP1 flat shards start mid-row
    starts = [(name, start) for name, start, numel, _ in three[1]["fsdp1"]["ranges"] if numel]
    shapes = {"layers.0.up_proj.weight": 13, "layers.0.down_proj.weight": 29, "layers.1.up_proj.weight": 13, "layers.1.down_proj.weight": 29}
    assert any(name in shapes and start % shapes[name] for name, start in starts)
    assert any("FlatParameter" in layout for layout in two[0]["fsdp1"]["layouts"])
    assert any("use_orig_params" in layout for layout in two[0]["fsdp1_orig"]["layouts"])
    # HSDP, FSDP1 NO_SHARD and HYBRID_SHARD: the second replica contributes nothing
    for kind in ("hsdp", "fsdp1_noshard", "fsdp1_hybrid"):
        assert not any(contributes for *_, contributes in two[1][kind]["ranges"]), kind
        assert all(contributes for *_, contributes in two[0][kind]["ranges"]), kind


def test_every_rank_reports_the_same_scalars(runs):
    _, _, two, three = runs
    for group in (two, three):
        for kind in group[0]:
            if isinstance(group[0][kind], dict) and "scalars" in group[0][kind]:
                first = group[0][kind]["scalars"]
                assert first and all(r[kind]["scalars"] == first for r in group), kind


def test_resume_on_another_world_size(runs):
    root, weights, two, three = runs
    result = three[0]["resume"]
    assert result == {"type": "CompassMonitor", "disabled": None, "world": 3}
    assert_same_store(root / "single8", root / "resume")
    run = open_run(root / "resume")
    assert run.steps.tolist() == [2, 4, 6, 8]
    events = [e["event"] for e in run.history]
    assert events[-2:] == ["resumed", "finished"]
    resumed = [e for e in run.history if e["event"] == "resumed"][-1]
    assert resumed["dropped"] == 1 and resumed["kept"] == 2 and resumed["world_size"] == 3


def test_load_state_dict_rewinds_every_rank(runs):
    root, _, two, _ = runs
    assert [r["rewind"] for r in two] == [{"after_rewind": (RESUME_AT, RESUME_AT), "disabled": None}] * 2
    assert_same_store(root / "single8", root / "rewind")


@pytest.mark.parametrize("world", [2, 3])
def test_no_weight_moves_on_the_snapshot_path(runs, world):
    """Per snapshot, every rank runs exactly one int64 all-reduce of counts and one uint8 gather of
    packed masks and row/column counts, whose size is the documented formula; no floating-point
    tensor and nothing near the size of the weights moves."""
    _, _, two, three = runs
    group = two if world == 2 else three
    for rank, result in enumerate(group):
        r = result["fsdp2"]
        snapshots = r["snapshot_calls"]
        assert len(snapshots) == 4  # steps 2, 4, 6 and 7 (at close)
        gather_bytes = max(r["payload_bytes"].values())
        expected = [("all_reduce", "int64", 8 * (2 + 6 * r["num_params"])), ("gather", "uint8", gather_bytes)]
        for calls in snapshots:
            assert calls == expected, (rank, calls)
        # the monitor's own record of its collectives agrees with the wrapped torch.distributed functions
        assert r["comm_snapshot"] == [("all_reduce_sum", "int64", expected[0][2]), ("gather", "uint8", gather_bytes)] * 4
        # what a rank sends, from its ranges alone: its weights' changed bits packed over the bytes
        # they touch, and int32 counts of the rows it touches and of every column -- 1 bit per
        # weight plus O(rows + columns) per matrix, where any gather of weights would need 16 or 32 bits
        mine = 0
        for (name, start, numel, contributes), (m, n) in zip(r["ranges"], r["shapes"]):
            if numel and contributes:
                rows = (start + numel - 1) // n - start // n + 1
                mine += ((start + numel + 7) // 8 - start // 8) + 4 * rows + 4 * n
        assert mine == r["payload_bytes"][rank]
        assert gather_bytes == max(g["fsdp2"]["payload_bytes"][i] for i, g in enumerate(group))


def test_a_snapshot_skipped_by_the_writer_is_skipped_on_every_rank(runs):
    """when_queue_full="skip": rank 0's full queue skips the snapshot everywhere; the gap is recorded and the
    next snapshot's flips count against the last stored one, exactly as in a single process."""
    root, _, _, three = runs
    assert all(r["skip"]["disabled"] is None for r in three)
    assert_same_store(root / "single7_skip", root / "skip_w3")
    run = open_run(root / "skip_w3")
    assert run.steps.tolist() == [2, 6, 7] and run.gaps == [(4, 4, 1)]


def test_a_failing_rank_disables_every_rank_at_the_same_snapshot(runs):
    root, _, two, _ = runs
    outcomes = [r["failure"] for r in two]
    assert all(not o["enabled"] for o in outcomes)
    assert all("injected failure" in o["reason"] for o in outcomes)
    assert all(o["step"] == 4 for o in outcomes)
    run = open_run(root / "failure")
    assert run.status == "disabled" and run.steps.tolist() == [2]


def test_unsupported_layouts_and_errors_are_raised_on_every_rank(runs):
    _, _, two, _ = runs
    for result in two:
        refused = result["refusals"]
        assert refused["shard1"] is not None and "1.weight" in refused["shard1"] and "Shard(1)" in refused["shard1"]
        if not refused["strided"].startswith("skipped"):
            assert "0.weight" in refused["strided"] and "_StridedShard" in refused["strided"]
        assert refused["selection"] is not None and "no_such_layer" in refused["selection"]
        assert refused["exists"] is not None and "already holds a run store" in refused["exists"]
