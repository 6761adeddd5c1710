"""Head boundaries come from the model's geometry: per matrix (GQA), else the run's, else --head-dim; never a guess.

Per-matrix facts (``head_dim``, ``heads``) live in the store's records of the matrices (``MatrixSpec.extra``,
written and read back by the store); the first test writes a real store whose records carry them.
"""

from __future__ import annotations

import asyncio

import pytest
import zarr

from compass_monitor import open_run
from compass_monitor.store import ParamInfo
from compass_monitor.tui.data import head_boundaries, head_dim_for, matrix_head_dim
from synthetic_runs import SyntheticSpec, SyntheticWriter, write_synthetic_run
from tui_helpers import text_of, wait_for


def record(kind: str, shape: tuple[int, int], **geometry) -> ParamInfo:
    return ParamInfo(name=f"model.layers.0.self_attn.{kind}_proj.weight", role="linear", module_type=kind, layer=0, shape=shape,
                     index=0, extra=geometry)


def test_per_matrix_geometry_from_the_store_first(tmp_path):
    # Grouped-query attention: 4 q heads of 16 and 2 k/v heads (k and v are 64 x 64 here, so 2 heads of 32 rows
    # each as recorded), o by its own head_dim; the run's metadata would say 8 (SyntheticSpec's head_dim).
    writer = SyntheticWriter(tmp_path / "run", spec=SyntheticSpec(layers=1, hidden=64, head_dim=8),
                             geometry={"q": {"heads": 4}, "k": {"heads": 2}, "v": {"heads": 2}, "o": {"head_dim": 16}})
    writer.append()
    writer.finish()
    run = open_run(tmp_path / "run")
    by_type = {p.module_type: p for p in run.params}
    assert by_type["k"].get("heads") == 2  # the store kept the fact
    sizes = {kind: matrix_head_dim(by_type[kind], run.attrs) for kind in ("q", "k", "v", "o", "up")}
    assert sizes == {"q": 16, "k": 32, "v": 32, "o": 16, "up": 8}  # up: no heads of its own, the run's value
    assert head_boundaries(by_type["k"], sizes["k"], "rows") == [32]
    assert head_boundaries(by_type["o"], sizes["o"], "cols") == [16, 32, 48]


def test_run_geometry_then_the_flag_then_nothing():
    old = record("q", (128, 128))  # a store written before per-matrix facts: none
    run_attrs = {"metadata": {"model_config": {"hidden_size": 128, "num_attention_heads": 4}}}
    assert matrix_head_dim(old, run_attrs) == 32
    assert matrix_head_dim(old, {"metadata": {}}, 64) == 64
    assert matrix_head_dim(old, {"metadata": {}}) is None and head_boundaries(old, None, "rows") == []  # no default of 64
    assert matrix_head_dim(record("q", (128, 128), heads=3), {"metadata": {}}) is None  # 128 rows do not split in 3
    assert matrix_head_dim(record("q", (128, 128), head_dim=64), run_attrs) == 64  # the matrix's own fact wins
    # Run-level facts at the top of the store's attributes win over user metadata.
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
            await pilot.pause()  # let the tabs finish mounting before the app shuts down (a race seen at load 20)
            legend = text_of(matrix, "#mask-legend")
            if heads is None:
                assert density.row_heads == set() and "size not recorded (--head-dim N)" in legend
            else:
                rows = density.grid.shape[0]
                assert rows >= 64  # one grid row per matrix row: block i holds row i
                assert density.row_heads == set(range(heads, 64, heads)) and f"heads of {heads}" in legend
            await pilot.press("escape")
            await pilot.pause()

    asyncio.run(main())
