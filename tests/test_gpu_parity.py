"""Device results equal CPU results on the same weights (run by ``bench/device_check.sh`` on a GPU machine).

Every test is marked ``gpu`` and skips without CUDA (listed in the summary).
What is compared, on identical weights (the CPU copy is updated, then copied
to the device, so both monitors see the same bits):

* the fused Triton mask pass (and the plain torch branch) on CUDA vs the numpy
  path, bit for bit: whole matrices of the Qwen3-8B kinds, odd widths (the flat
  kernel), FSDP1 ranges starting mid-row and mid-byte, edge values;
* a CompassMonitor on a CUDA model vs one on its CPU copy, fp32 masters and
  bf16 weights: masks, counts, row/column profiles, previews, class counts,
  fingerprints, base codes, nulls exactly; principal masks (float64 ``eigh`` on
  the device vs the host) equal or off in a handful of boundary bits, and then
  every count that depends on them consistent with the device's own masks;
  spectra within the fidelity tolerances (``tests/test_spectral.py``);
* the sharded path with one rank over a real NCCL process group (FSDP2
  ``fully_shard`` on a CUDA mesh) vs the single-process CPU store.

``COMPASS_PARITY_DEVICE=cpu`` runs the comparisons CPU-vs-CPU (gloo instead of
NCCL, the fused kernel left out): a dry run of this file's own logic.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.bf16 import bf16_bits, canonical_bits
from compass_monitor.matrix_probe import measure_range as _measure_range
from compass_monitor.shard_geometry import pack_aligned

DEVICE = os.environ.get("COMPASS_PARITY_DEVICE", "cuda")
DRY_RUN = DEVICE == "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIG = dict(every_n_steps=1, principal_rank=8, alpha=0.5, spectral_every=2, spectral_k=4, writer_queue=0)
# Principal masks come from float64 eigh on each device: scores equal to ~1e-15
# relative, so at most a few elements at the selection threshold may swap.
PRINCIPAL_BITS_TOLERANCE = 4
NSS_RTOL, NSS_FLOOR, ANGLE_ATOL_DEG, ENERGY_RTOL = 0.02, 1e-6, 0.02, 0.02  # twice tests/test_spectral.py's, one per side


# ----------------------------------------------------------------------------- the fused pass


def _range_state(values: torch.Tensor, base: torch.Tensor, start: int, rng: np.random.Generator) -> SimpleNamespace:
    numel = values.numel()
    nbytes = (start + numel + 7) // 8 - start // 8
    reference = torch.from_numpy(np.stack([pack_aligned(rng.random(numel) < 0.5, start) for _ in range(3)]))
    previous = torch.from_numpy(pack_aligned(rng.random(numel) < 0.2, start))
    assert reference.shape == (3, nbytes)
    return SimpleNamespace(
        shard=SimpleNamespace(local=lambda: values), start=start, numel=numel, base_bits=base,
        reference_packed=reference, previous_packed=previous,
    )  # fmt: skip


def _to(state: SimpleNamespace, device: str) -> SimpleNamespace:
    values = state.shard.local().to(device)
    return SimpleNamespace(
        shard=SimpleNamespace(local=lambda: values), start=state.start, numel=state.numel, base_bits=state.base_bits.to(device),
        reference_packed=state.reference_packed.to(device), previous_packed=state.previous_packed.to(device),
    )  # fmt: skip


def _edge_values(numel: int, rng: np.random.Generator) -> torch.Tensor:
    """fp32 weights salted with +-0, subnormals, NaN, +-Inf, bf16 halfway points and the overflow to Inf."""
    w = rng.standard_normal(numel).astype(np.float32) * 0.02
    bits = w.view(np.uint32)
    special = np.array(
        [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7FC00000, 0xFFC00001, 0x7F800000, 0xFF800000, 0x7F7FFFFF,
         0x3F808000, 0x3F818000, 0x3F807FFF],
        dtype=np.uint32,
    )  # fmt: skip
    where = rng.choice(numel, size=min(numel, 4 * special.size), replace=False)
    bits[where] = np.resize(special, where.size)
    halfway = rng.random(numel) < 0.01  # exactly halfway between bf16 neighbours
    bits[halfway] = (bits[halfway] & 0xFFFF0000) | 0x8000
    return torch.from_numpy(bits.view(np.float32).copy())


CASES = [
    # (m, n), start, numel, dtype
    ((4096, 4096), 0, 4096 * 4096, torch.float32),  # q/o
    ((1024, 4096), 0, 1024 * 4096, torch.bfloat16),  # k/v
    ((12288, 4096), 0, 12288 * 4096, torch.float32),  # gate/up
    ((4096, 12288), 512 * 12288, 1024 * 12288, torch.bfloat16),  # a row-sharded slice of down
    ((4096, 12288), 3 * 12288 + 5, 7_000_003, torch.float32),  # an FSDP1 range: mid-row, mid-byte
    ((1000, 4100), 0, 1000 * 4100, torch.float32),  # odd width: the flat kernel
    ((1, 100_003), 1, 100_001, torch.bfloat16),
    ((77_777, 1), 13, 70_000, torch.float32),
]


@pytest.mark.parametrize(("shape", "start", "numel", "dtype"), CASES)
def test_fused_and_torch_branch_equal_numpy(rng, shape, start, numel, dtype):
    w0 = _edge_values(numel, rng)
    base = canonical_bits(bf16_bits(w0).clone())
    current = w0.clone()
    moved = torch.from_numpy(rng.random(numel) < 0.3)
    current[moved] += torch.from_numpy(rng.standard_normal(int(moved.sum())).astype(np.float32)) * 1e-3
    current = current.to(dtype)
    host = _range_state(current, base, start, rng)
    expected = [np.asarray(x) for x in _measure_range(host, shape, backend="numpy")]
    device = _to(host, DEVICE)
    for backend in ("auto", "torch"):  # auto: the fused kernel on CUDA with triton
        got = _measure_range(device, shape, backend=backend)
        if not DRY_RUN:  # on the device, not synchronised (the dry run's auto path is numpy)
            assert all(t.device.type == DEVICE for t in got), backend
        for name, g, e in zip(("counts", "rows", "cols", "packed"), got, expected):
            host_g = g.cpu().numpy() if isinstance(g, torch.Tensor) else g
            assert host_g.dtype == e.dtype, (backend, name)
            np.testing.assert_array_equal(host_g, e, err_msg=f"{backend} {name}")


@pytest.mark.skipif(DRY_RUN, reason="the fused kernel runs on CUDA only (its CPU tests: test_kernels_interpret.py)")
def test_many_ranges_in_one_launch_equal_numpy(rng):
    from compass_monitor import kernels

    host_states, shapes, expected = [], [], []
    for shape, start, numel, dtype in CASES[1:2] + CASES[3:]:  # mixed dtypes, slices, mid-byte starts, odd widths
        w0 = _edge_values(numel, rng)
        base = canonical_bits(bf16_bits(w0).clone())
        current = (w0 * torch.from_numpy(np.where(rng.random(numel) < 0.3, 1.01, 1.0).astype(np.float32))).to(dtype)
        host = _range_state(current, base, start, rng)
        host_states.append(host)
        shapes.append(shape)
        expected.append([np.asarray(x) for x in _measure_range(host, shape, backend="numpy")])
    got = kernels.fused_measure_ranges([_to(s, DEVICE) for s in host_states], shapes)
    for (shape, *_), want, result in zip(CASES[1:2] + CASES[3:], expected, got):
        for name, g, e in zip(("counts", "rows", "cols", "packed"), result, want):
            np.testing.assert_array_equal(g.cpu().numpy(), e, err_msg=f"{shape} {name}")


@pytest.mark.skipif(DRY_RUN, reason="the fused kernel runs on CUDA only (its CPU tests: test_kernels_interpret.py)")
def test_the_fused_kernel_is_what_auto_runs():
    from compass_monitor import kernels

    assert kernels.fused_available(torch.device("cuda")), "triton missing: the GPU path would fall back to plain torch"
    values = torch.randn(4096 * 1024, device="cuda")
    base = canonical_bits(bf16_bits(values).clone())
    reference = torch.zeros(3, values.numel() // 8, dtype=torch.uint8, device="cuda")
    previous = torch.zeros(values.numel() // 8, dtype=torch.uint8, device="cuda")
    kernels.fused_mask_pass(values, base, reference, previous, start=0, shape=(1024, 4096))  # compiled outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside raises
    try:
        counts, *_ = kernels.fused_mask_pass(values + 1.0, base, reference, previous, start=0, shape=(1024, 4096))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0 < int(counts[0]) <= values.numel()


# ----------------------------------------------------------------------------- whole monitors


def _tiny_llama(dtype: torch.dtype):
    """A random 2-layer Llama: q 64x64, k/v 32x64, gate/up 172x64, down 64x172 (172 % 8 != 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def _update(model, rng: np.random.Generator, step: int) -> None:
    """A sparse, varied update of every linear weight (some steps touch nothing, one writes NaN/Inf/-0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2 or "proj" not in name:
                continue
            scale = torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)).to(p.dtype)
            keep = torch.from_numpy(rng.random(tuple(p.shape)) < 0.3)
            p.add_(torch.where(keep, scale * p.abs() * 0.02, torch.zeros_like(p)))
            if "down_proj" in name and step in (3, 4):  # non-finite at step 3 only (step 4 is spectral)
                special = [float("nan"), float("inf"), -0.0, -float("inf")] if step == 3 else [0.01, -0.02, 0.0, 0.03]
                p.view(-1)[:4] = torch.tensor(special, dtype=p.dtype)


def _copy_weights(src, dst) -> None:
    with torch.no_grad():
        for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
            local = b.to_local() if hasattr(b, "to_local") else b
            local.copy_(a.to(local.device).reshape(local.shape))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: obj[...] for name, obj in group.members(max_depth=None) if isinstance(obj, zarr.Array) and name != "snapshots/time"}


def _assert_parity(expected: Path, got: Path) -> None:
    """The device store against the CPU store: exact, except where the principal masks may differ by a few bits."""
    a, b = _arrays(expected), _arrays(got)
    assert sorted(a) == sorted(b)
    cpu_run, dev_run = open_run(expected), open_run(got)
    differing = 0
    for p in range(len(cpu_run.params)):
        for which in ("low", "principal", "principal_not_low"):
            x, y = cpu_run.reference_mask(p, which), dev_run.reference_mask(p, which)
            assert x.sum() == y.sum(), (p, which)  # exact selection sizes on both devices
            if which == "low":
                np.testing.assert_array_equal(x, y, err_msg=f"low mask of {p}")
            differing += int((x != y).sum()) if which == "principal" else 0
    assert differing <= PRINCIPAL_BITS_TOLERANCE, f"{differing} principal-mask bits differ"
    principal_dependent = ("masks/reference", "base/class_counts", "metrics/null_overlap", "metrics/counts", "metrics/spectral")
    for name, x in a.items():
        if differing and name.startswith(principal_dependent) or name.startswith("metrics/spectral"):
            continue
        np.testing.assert_array_equal(b[name], x, err_msg=name)
    # Counts on both devices: the device's own masks give the device's counts.
    counts = dev_run.counts
    for t in range(dev_run.num_snapshots):
        for p in range(len(dev_run.params)):
            mask = dev_run.mask(p, t).reshape(-1)
            refs = [dev_run.reference_mask(p, w).reshape(-1) for w in ("principal", "low", "principal_not_low")]
            want = [mask.sum(), (mask & refs[0]).sum(), (mask & refs[1]).sum(), (mask & refs[2]).sum()]
            assert counts[t, p, :4].tolist() == [int(v) for v in want], (t, p)
    np.testing.assert_array_equal(counts[..., [0, 2, 4, 5]], cpu_run.counts[..., [0, 2, 4, 5]])
    assert cpu_run.counts[..., 5].sum() > 0 and cpu_run.counts[..., 0].sum() > 0  # the edge values were seen
    spectral_cpu, spectral_dev = cpu_run.spectral_metrics, dev_run.spectral_metrics
    computed = ~np.isnan(spectral_cpu[..., 0])
    assert computed.any() and np.array_equal(computed, ~np.isnan(spectral_dev[..., 0]))
    nss_cpu, nss_dev = spectral_cpu[..., 0][computed], spectral_dev[..., 0][computed]
    big = nss_cpu >= NSS_FLOOR
    assert np.all(np.abs(nss_dev - nss_cpu)[big] <= NSS_RTOL * nss_cpu[big])
    assert np.all(np.abs(nss_dev - nss_cpu)[~big] <= NSS_RTOL * NSS_FLOOR)
    angles = np.abs(spectral_dev[..., 1:3][computed] - spectral_cpu[..., 1:3][computed])
    assert np.nanmax(angles) <= ANGLE_ATOL_DEG
    energy_cpu, energy_dev = spectral_cpu[..., 3][computed], spectral_dev[..., 3][computed]
    assert np.all(np.abs(energy_dev - energy_cpu) <= ENERGY_RTOL * np.abs(energy_cpu) + 1e-10)
    # The spectra of Fig. 4: all angles and the top-k singular values, NaN in the same places.
    for cpu_values, dev_values, close in (
        (cpu_run.spectral_angles, dev_run.spectral_angles, lambda x, y: np.abs(x - y) <= ANGLE_ATOL_DEG),
        (cpu_run.spectral_singular_values, dev_run.spectral_singular_values, lambda x, y: np.abs(x - y) <= 2e-6 * np.abs(x)),
        (cpu_run.spectral_base_singular_values, dev_run.spectral_base_singular_values, lambda x, y: np.abs(x - y) <= 2e-6 * np.abs(x)),
    ):
        assert np.array_equal(np.isnan(cpu_values), np.isnan(dev_values))
        finite = ~np.isnan(cpu_values)
        assert finite.any() and close(cpu_values[finite], dev_values[finite]).all()


def _run_pair(tmp_path: Path, rng: np.random.Generator, dtype: torch.dtype, device_monitor) -> None:
    cpu_model = _tiny_llama(dtype)
    dev_model = device_monitor["model"](copy.deepcopy(cpu_model))
    config = MonitorConfig(**CONFIG)
    cpu_monitor = CompassMonitor(cpu_model, tmp_path / "cpu", config=config)
    dev = device_monitor["monitor"](dev_model, tmp_path / "dev", config)
    for step in range(1, 5):
        _update(cpu_model, rng, step)
        _copy_weights(cpu_model, dev_model)
        cpu_monitor.on_optimizer_step()
        dev.on_optimizer_step()
    cpu_monitor.close()
    dev.close()
    assert cpu_monitor.disabled_reason is None and dev.disabled_reason is None, (cpu_monitor.disabled_reason, dev.disabled_reason)
    _assert_parity(tmp_path / "cpu", tmp_path / "dev")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_monitor_on_the_device_equals_the_cpu(tmp_path, rng, dtype):
    def monitor(model, path, config):
        return CompassMonitor(model, path, config=config)

    _run_pair(tmp_path, rng, dtype, {"model": lambda m: m.to(DEVICE), "monitor": monitor})


def test_sharded_one_rank_nccl_equals_the_cpu(tmp_path, rng):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    backend = "gloo" if DRY_RUN else "nccl"
    if not DRY_RUN:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:

        def shard(model):
            model = model.to(DEVICE)
            mesh = init_device_mesh(DEVICE, (1,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model

        def monitor(model, path, config):
            result = CompassMonitor(model, path, config=config)
            assert result.probe.layout.kind == "fsdp2", result.probe.layout.kind
            if not DRY_RUN:
                assert result.comm.device.type == "cuda"  # the NCCL collectives run on the device
            return result

        _run_pair(tmp_path, rng, torch.float32, {"model": shard, "monitor": monitor})
    finally:
        dist.destroy_process_group()
