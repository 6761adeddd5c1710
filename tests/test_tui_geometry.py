"""Head boundaries come from the model's geometry: per matrix (GQA), else the run's, else --head-dim; never a guess.

The store's per-matrix records do not carry ``head_dim`` / ``heads`` yet (the core records them from the model's
config, issue 10/16); :func:`matrix_head_dim` reads them when present, which the first test holds with records
that have them, and falls back to the run's metadata, which the pilot tests hold on real stores.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import zarr

from compass_monitor.store import ParamInfo
from compass_monitor.tui.data import head_boundaries, head_dim_for, matrix_head_dim
from synthetic_runs import SyntheticSpec, write_synthetic_run
from tui_helpers import text_of, wait_for


@dataclasses.dataclass(frozen=True)
class RecordWithGeometry(ParamInfo):
    """A store record as the core writes it with the model's geometry (None in stores written before)."""

    head_dim: int | None = None
    heads: int | None = None


def record(kind: str, shape: tuple[int, int], **geometry) -> RecordWithGeometry:
    return RecordWithGeometry(0, "p0000", f"model.layers.0.self_attn.{kind}_proj.weight", "linear", kind, 0, shape, **geometry)


def test_per_matrix_geometry_first_then_the_run_then_the_flag():
    # Grouped-query attention, Llama-style: 8 q heads and 2 k/v heads of 16 over a hidden size of 128.
    q, k, o = record("q", (128, 128), heads=8), record("k", (32, 128), heads=2), record("o", (128, 128), head_dim=16)
    run_attrs = {"metadata": {"model_config": {"hidden_size": 128, "num_attention_heads": 4}}}  # would say 32
    assert matrix_head_dim(q, run_attrs) == 16 and matrix_head_dim(k, run_attrs) == 16 and matrix_head_dim(o, run_attrs) == 16
    assert head_boundaries(k, matrix_head_dim(k, run_attrs), "rows") == [16]
    assert head_boundaries(o, matrix_head_dim(o, run_attrs), "cols") == list(range(16, 128, 16))
    # Old stores: no per-matrix values -> the run's geometry, then --head-dim, else nothing (no default of 64).
    old = record("q", (128, 128))
    assert matrix_head_dim(old, run_attrs) == 32
    assert matrix_head_dim(old, {"metadata": {}}, 64) == 64
    assert matrix_head_dim(old, {"metadata": {}}) is None and head_boundaries(old, None, "rows") == []
    assert matrix_head_dim(record("q", (128, 128), heads=3), {"metadata": {}}) is None  # 128 rows do not split in 3
    # The run-level facts the core records at the top of the store's attributes win over user metadata.
    assert head_dim_for({"hidden_size": 384, "num_attention_heads": 12, "metadata": {"head_dim": 64}}) == 32
    assert head_dim_for({"metadata": {"head_dim": True}}) is None  # not a size


def with_metadata(path, metadata: dict) -> None:
    group = zarr.open_group(store=str(path), mode="r+")
    group.attrs["metadata"] = metadata


@pytest.mark.parametrize(
    "metadata, flag, heads",
    [
        ({"model_config": {"hidden_size": 64, "num_attention_heads": 4}}, None, 16),  # MiniLM-style config: 64 / 4
        ({"head_dim": 8}, None, 8),
        ({}, 32, 32),  # nothing recorded: --head-dim
        ({}, None, None),  # nothing at all: no marks, and the legend says why
    ],
)
def test_drill_down_marks_the_recorded_heads(tmp_path, metadata, flag, heads):
    from compass_monitor.tui.app import CompassApp
    from compass_monitor.tui.widgets.density_map import DensityMap

    path = write_synthetic_run(tmp_path / "run", snapshots=3, spec=SyntheticSpec(layers=1, hidden=64, head_dim=16))
    with_metadata(path, metadata)

    async def main() -> None:
        async with CompassApp(path, head_dim=flag).run_test(size=(120, 70)) as pilot:
            screen = pilot.app.screen
            await wait_for(pilot, lambda: screen.view is not None, what="the run")
            await pilot.press("enter")  # row 0: L0 q, 64 rows
            matrix = pilot.app.screen
            density = matrix.query_one(DensityMap)
            await wait_for(pilot, lambda: "mask" in matrix.shown, what="the exact mask map")
            legend = text_of(matrix, "#mask-legend")
            if heads is None:
                assert density.row_heads == set() and "size not recorded (--head-dim N)" in legend
            else:
                rows = density.grid.shape[0]
                assert rows >= 64  # one grid row per matrix row: block i holds row i
                assert density.row_heads == set(range(heads, 64, heads)) and f"heads of {heads}" in legend

    asyncio.run(main())
