"""The probe on simulated ranks (threads of this process): any partition of any
matrix into flat ranges gives exactly the single-process base and snapshots.

Partitions are random: row blocks (FSDP2 Shard(0)), mid-row cuts (FSDP1 flat
shards), empty ranges, and non-contributing replicas (HSDP). The reference is
the probe on each whole matrix in one process (``whole_probe``), itself checked
against numpy references in ``test_matrix_probe.py``.
The real gloo collectives are exercised by ``test_sharded_dist.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compass_monitor import MonitorConfig
from compass_monitor.exact_selection import radix_select, select_count, top_count_mask
from compass_monitor.matrix_probe import base_fingerprint, fingerprint_partial
from compass_monitor.probe import ShardProbe
from compass_monitor.principal import (
    gram_from_parts,
    gram_parts,
    principal_mask,
    principal_scores,
    project_rows,
    scale_exponent,
    top_basis,
)
from compass_monitor.shard_geometry import aligned_nbytes, pack_aligned, slice_aligned
from compass_monitor.selection import ParamSpec
from compass_monitor.sharding import LocalShard, ShardLayout
from dist_helpers import ThreadHub
from references import low_magnitude_mask
from whole_probe import capture_base, measure

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def realistic(rng: np.random.Generator, m: int, n: int) -> torch.Tensor:
    w = rng.standard_normal((m, n)) * 0.02
    w[rng.random((m, n)) < 0.02] *= 30.0
    w[rng.random((m, n)) < 0.02] *= 1e-5  # tiny weights: below the fixed-point grid's exact range
    w[rng.random((m, n)) < 0.01] = 0.0
    return torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16).float()


def random_cuts(rng: np.random.Generator, numel: int, world: int, n: int, kind: str) -> list[tuple[int, int]]:
    """(start, numel) per rank covering [0, numel)."""
    if kind == "rows":  # torch.chunk of rows, as FSDP2 Shard(0)
        m = numel // n
        size = -(-m // world)
        bounds = [min(r * size, m) * n for r in range(world)] + [numel]
    else:  # arbitrary flat cuts (FSDP1), some ranks empty
        inner = sorted(rng.integers(0, numel + 1, size=world - 1).tolist())
        bounds = [0] + inner + [numel]
    return [(bounds[r], bounds[r + 1] - bounds[r]) for r in range(world)]


def make_layouts(specs_tensors, cuts_per_param, world, replicas=1):
    """ShardLayouts for world*replicas simulated ranks; replica > 0 holds the same ranges but does not contribute."""
    layouts = []
    for rank in range(world * replicas):
        replica, shard_rank = divmod(rank, world)
        shards = []
        for (spec, tensor), cuts in zip(specs_tensors, cuts_per_param):
            start, numel = cuts[shard_rank]
            flat = tensor.reshape(-1)

            def values(flat=flat, start=start, numel=numel):
                return flat[start : start + numel]

            shards.append(LocalShard(spec=spec, start=start if numel else 0, numel=numel, contributes=replica == 0, layout="test", values=values))
        layouts.append(ShardLayout(shards=shards, kind="test", rank=rank, world_size=world * replicas))
    return layouts


def single_reference(specs_tensors, config):
    out = []
    for spec, tensor in specs_tensors:
        state, cc, fp, bad = capture_base(spec, tensor, rank=config.principal_rank, alpha=config.alpha)
        out.append((state, cc.numpy(), fp.numpy(), int(bad)))
    return out


def drift(rng, tensor: torch.Tensor) -> None:
    with torch.no_grad():
        noise = torch.from_numpy(rng.standard_normal(tuple(tensor.shape)).astype(np.float32))
        tensor.add_(noise * tensor.abs() * 0.01 * (torch.rand(tensor.shape) < 0.6))


SHAPES = [(29, 13), (13, 29), (2, 7), (1, 40), (40, 1), (31, 17), (7, 300), (300, 7)]


@pytest.mark.parametrize(
    "world, kind, backend, group",
    [(1, "rows", "auto", None), (1, "rows", "torch", None), (2, "rows", "auto", None), (3, "rows", "auto", None), (5, "rows", "auto", None), (2, "flat", "auto", None),
     (3, "flat", "auto", None), (5, "flat", "auto", None), (3, "rows", "torch", None), (3, "flat", "torch", None),
     (3, "flat", "auto", 200)],
)
def test_random_partitions_equal_single_process(rng, monkeypatch, world, kind, backend, group):
    """backend="torch" runs the accelerator code path (torch ops, one host copy per kind) on the CPU;
    group=200 computes the base a few matrices at a time."""
    if group is not None:
        import compass_monitor.probe as probe

        monkeypatch.setattr(probe, "BASE_GROUP_ELEMENTS", group)
    config = MonitorConfig(principal_rank=3, alpha=float(rng.choice([0.5, rng.uniform(0.1, 0.9)])))
    specs_tensors = []
    for i, (m, n) in enumerate(SHAPES):
        spec = ParamSpec(name=f"layers.{i}.q_proj.weight", role="linear", module_type="q", layer=i, shape=(m, n))
        specs_tensors.append((spec, realistic(rng, m, n)))
    cuts = [random_cuts(rng, spec.numel, world, spec.shape[1], kind) for spec, _ in specs_tensors]
    replicas = 2 if world == 2 else 1
    layouts = make_layouts(specs_tensors, cuts, world, replicas)
    reference = single_reference(specs_tensors, config)
    hub = ThreadHub(world * replicas)

    def base(comm):
        core = ShardProbe(layouts[comm.rank], config, comm=comm)
        return core, core.capture_base(want_codes=True)

    results = hub.run(base)
    got = results[0][1]
    for p, (state, cc, fp, bad) in enumerate(reference):
        np.testing.assert_array_equal(got.reference_packed[p], state.reference_packed.numpy(), err_msg=f"reference masks of {p}")
        np.testing.assert_array_equal(got.class_counts[p], cc)
        np.testing.assert_array_equal(got.fingerprints[p], fp)
        np.testing.assert_array_equal(got.base_codes[p], state.base_bits.numpy().reshape(-1))
        assert got.nonfinite[p] == bad
    for r in range(1, world * replicas):  # every rank holds the same global numbers
        np.testing.assert_array_equal(results[r][1].class_counts, got.class_counts)
        assert results[r][1].reference_packed is None

    cores = [r[0] for r in results]
    for core in cores:
        core.backend = backend
    for snapshot in range(3):
        for _, tensor in specs_tensors:
            drift(rng, tensor)
        expected = [measure(state, tensor) for (state, *_), (_, tensor) in zip(reference, specs_tensors)]

        def snap(comm):
            core = cores[comm.rank]
            core.comm = comm
            local = core.measure()
            counts, flags = core.reduce(local)
            pieces = core.collect(local)
            core.accept(local)
            return counts, flags, pieces

        out = hub.run(snap)
        counts, flags, (rows, cols, packed) = out[0]
        assert flags == {"error": 0, "skip": 0}
        for p, e in enumerate(expected):
            assert counts[p].tolist() == e.counts.tolist(), (snapshot, p)
            np.testing.assert_array_equal(rows[p], e.rows.numpy())
            np.testing.assert_array_equal(cols[p], e.cols.numpy())
            np.testing.assert_array_equal(packed[p], e.packed.numpy())
        for r in range(1, world * replicas):
            np.testing.assert_array_equal(out[r][0], counts)
            assert out[r][2] is None


def test_principal_scores_partition_invariant(rng):
    """The exact Gram parts of any row split add up to the same bits; projection rows do not depend on neighbours."""
    for m, n, k in [(300, 40, 8), (40, 300, 8), (513, 64, 16), (64, 65, 8)]:
        w = realistic(rng, m, n)
        whole = principal_scores(w, k)
        a = w.double() if m >= n else w.double().T
        rows = a.shape[0]
        exponent = scale_exponent(float(a.abs().max()))
        cuts = sorted({0, rows, *rng.integers(0, rows + 1, size=4).tolist()})
        parts = [gram_parts(a[c0:c1], max_exponent=exponent, rows_total=rows) for c0, c1 in zip(cuts, cuts[1:])]
        order = rng.permutation(len(parts))
        hh = sum((parts[i][0] for i in order), torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64))
        hl = sum((parts[i][1] for i in order), torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64))
        basis = top_basis(gram_from_parts(hh, hl, rows_total=rows), k)
        pieces = torch.cat([project_rows(a[c0:c1], c0, basis, rows_total=rows) for c0, c1 in zip(cuts, cuts[1:])])
        assert torch.equal(pieces if m >= n else pieces.T, whole), (m, n)


def test_principal_scores_match_float64_svd(rng):
    for m, n, k in [(120, 90, 8), (90, 120, 3), (64, 65, 16)]:
        w = realistic(rng, m, n)
        u, s, vt = np.linalg.svd(w.double().numpy(), full_matrices=False)
        ref = np.abs((u[:, :k] * s[:k]) @ vt[:k])
        got = principal_scores(w, k).double().numpy()
        # float32 rounding of the output, plus a float64-level perturbation bound
        bound = np.spacing(ref.astype(np.float32)).astype(np.float64) + 64 * np.finfo(np.float64).eps * s[0] * (1 + s[0] / (s[k - 1] - s[k]))
        assert np.all(np.abs(got - ref) <= bound)
        mask = principal_mask(w, k, 0.5)
        assert int(mask.sum()) == select_count(m * n, 0.5)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_radix_select_equals_top_count_mask(rng, world):
    kinds = [
        rng.standard_normal(500).astype(np.float32),
        rng.integers(0, 4, 500).astype(np.float32),
        rng.choice(np.array([-0.0, 0.0, 1.0, -1.0, np.inf, -np.inf], dtype=np.float32), 500),
        np.zeros(0, dtype=np.float32),
    ]
    scores = [torch.from_numpy(k) for k in kinds]
    counts = [int(rng.integers(0, s.numel() + 1)) for s in scores] + [0, scores[0].numel()]
    scores += [scores[0], scores[0]]
    cuts = [random_cuts(rng, s.numel(), world, 1, "flat") for s in scores]
    starts = [[c[r][0] if c[r][1] else -1 for r in range(world)] for c in cuts]

    def run(comm):
        local = [s[c[comm.rank][0] : c[comm.rank][0] + c[comm.rank][1]] for s, c in zip(scores, cuts)]
        return radix_select(comm, local, counts, starts)

    out = ThreadHub(world).run(run)
    for i, (score, count) in enumerate(zip(scores, counts)):
        whole = torch.cat([out[r][i] for r in range(world)]) if score.numel() else torch.zeros(0, dtype=torch.bool)
        assert torch.equal(whole, top_count_mask(score, count)), (i, count)


def test_low_mask_partitioned(rng):
    w = realistic(rng, 37, 11)
    spec = ParamSpec(name="x", role="linear", module_type="other", layer=-1, shape=(37, 11))
    cuts = random_cuts(rng, spec.numel, 3, 11, "flat")
    (layouts) = make_layouts([(spec, w)], [cuts], 3)
    config = MonitorConfig(principal_rank=64, alpha=0.3)

    def run(comm):
        return ShardProbe(layouts[comm.rank], config, comm=comm).capture_base().reference_packed

    ref = ThreadHub(3).run(run)[0][0]
    low = low_magnitude_mask(w, 0.3)
    np.testing.assert_array_equal(ref[1], np.packbits(low.numpy().ravel()))


def test_pack_aligned_ranges_or_together(rng):
    for _ in range(50):
        numel = int(rng.integers(0, 200))
        mask = rng.random(numel) < 0.5
        cuts = sorted(rng.integers(0, numel + 1, size=3).tolist())
        bounds = [0, *cuts, numel]
        whole = np.zeros((numel + 7) // 8, dtype=np.uint8)
        for s, e in zip(bounds, bounds[1:]):
            piece = pack_aligned(mask[s:e], s)
            assert piece.size == aligned_nbytes(s, e - s)
            if piece.size:
                whole[s // 8 : s // 8 + piece.size] |= piece
            torch_piece = pack_aligned(torch.from_numpy(mask[s:e]), s)
            np.testing.assert_array_equal(torch_piece.numpy(), piece)
            np.testing.assert_array_equal(slice_aligned(np.packbits(mask), s, e - s), piece)
        np.testing.assert_array_equal(whole, np.packbits(mask))


def test_fingerprint_partials_sum_to_whole(rng):
    codes = torch.from_numpy(rng.integers(-(2**15), 2**15, size=1000).astype(np.int16))
    whole = base_fingerprint(codes)
    cuts = [0, *sorted(rng.integers(0, 1001, size=4).tolist()), 1000]
    total = sum(fingerprint_partial(codes[s:e], s) for s, e in zip(cuts, cuts[1:])) % (2**31 - 1)
    assert torch.equal(total, whole)


def test_gaps_and_overlaps_are_refused(rng):
    from compass_monitor.sharding import ShardingError

    w = realistic(rng, 6, 5)
    spec = ParamSpec(name="layers.0.q_proj.weight", role="linear", module_type="q", layer=0, shape=(6, 5))
    config = MonitorConfig(principal_rank=2)
    for cuts, what in ([[(0, 10), (12, 18)], "gap"], [[(0, 16), (12, 18)], "overlap"]):
        layouts = make_layouts([(spec, w)], [cuts], 2)
        with pytest.raises(ShardingError, match="q_proj.weight"):
            ThreadHub(2).run(lambda comm: ShardProbe(layouts[comm.rank], config, comm=comm))
