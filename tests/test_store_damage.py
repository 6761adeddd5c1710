"""Damage is detected, never read as data: a corruption table over every array of a store.

Each case damages one file of a freshly written store (a chunk of every kind of array missing,
truncated, zero-filled, bit-flipped, replaced by a symlink loop, unreadable; the commit file
and metadata of the wrong JSON type or out of range). Each must give a one-line
StoreDamagedError naming the file, from the reader API, from `compass-monitor inspect`, from
`summary` (whenever summary reads that array; otherwise summary prints exactly the intact
store's numbers), and from resume. Nothing returns numbers from a damaged file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from compass_monitor import cli
from compass_monitor.store import RunWriter, StoreDamagedError, open_run
from compass_monitor.store import schema
from store_stream import SHAPES, masks, record, specs

SNAPSHOTS = 6
LAST = SNAPSHOTS - 1


def write_store(path: Path) -> None:
    writer = RunWriter.create(path, params=specs(), attributes={"config": {"every_n_steps": 1, "alpha": 0.1}}, key_interval=4)
    rng = np.random.default_rng(5)
    writer.write_base(
        fingerprints=rng.integers(0, 1000, (len(SHAPES), 2)),
        class_counts=rng.integers(0, 5, (len(SHAPES), 4, 512)),
        reference_packed=[rng.integers(0, 256, (3, (m * n + 7) // 8), dtype=np.uint8) for m, n in SHAPES],
        base_codes=[rng.integers(-1000, 1000, (m, n), dtype=np.int16) for m, n in SHAPES],
    )
    stream = masks(11, SNAPSHOTS)
    for t in range(SNAPSHOTS):
        rec = record(t + 1, stream[t], stream[t - 1] if t else None)
        writer.append(rec.__class__(**{**rec.__dict__, "spectral": np.full((len(SHAPES), 4), 0.25)}))
    writer.finalize()


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("intact") / "run"
    write_store(path)
    return path


def read_everything(path: Path) -> None:
    """Every read a viewer, summary or resume makes."""
    run = open_run(path)
    run.steps, run.times, run.counts, run.null_overlap, run.spectral_metrics, run.frames()  # noqa: B018
    run.base_fingerprint, run.base_class_counts  # noqa: B018
    for p in run.params:
        run.base_codes(p)
        for which in schema.REFERENCE_MASKS:
            run.reference_mask(p, which)
        run.row_counts(p), run.col_counts(p)  # noqa: B018
        for t in range(run.num_snapshots):
            run.mask(p, t)
            run.preview_counts(p, t)


def chunk(path: Path, array: str, row: int) -> Path:
    """The chunk file holding ``row`` (clipped to the array) of ``array``, by its zarr.json."""
    meta = json.loads((path / array / "zarr.json").read_text())
    rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    index = [min(row, meta["shape"][0] - 1) // rows] + [0] * (len(meta["shape"]) - 1)
    sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    return path / array / sep.join(["c", *map(str, index)])


def missing(f: Path) -> None:
    f.unlink()


def truncated(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def zero_filled(f: Path) -> None:
    f.write_bytes(bytes(f.stat().st_size))


def bit_flipped(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10
    f.write_bytes(bytes(data))


def symlink_loop(f: Path) -> None:
    f.unlink()
    os.symlink(f.name, f)


def unreadable(f: Path) -> None:
    # chmod 000 does not stop root, who runs CI containers: a directory in the file's place
    # cannot be read as a file by anyone.
    f.unlink()
    f.mkdir()


DAMAGES = [missing, truncated, zero_filled, bit_flipped, symlink_loop, unreadable]
ARRAYS = [
    schema.STEPS, schema.TIMES, schema.COUNTS, schema.NULL_OVERLAP, schema.FRAMES, schema.SPECTRAL,
    f"{schema.CHANGED_PREFIX}/p0001", f"{schema.ROWS_PREFIX}/p0001", f"{schema.COLS_PREFIX}/p0001",
    f"{schema.PREVIEW_PREFIX}/p0001", f"{schema.REFERENCE_PREFIX}/p0001", f"{schema.BASE_WEIGHTS_PREFIX}/p0001",
    schema.BASE_FINGERPRINT, schema.BASE_CLASS_COUNTS,
]
# What `summary` reads (the other arrays it never touches: it must print the intact numbers).
SUMMARY_READS = {schema.STEPS, schema.COUNTS, schema.NULL_OVERLAP, schema.SPECTRAL, schema.BASE_CLASS_COUNTS}
# What resume reads from the store: the kept last row of every time-indexed array and the masks.
RESUME_READS = {schema.STEPS, schema.TIMES, schema.COUNTS, schema.NULL_OVERLAP, schema.FRAMES, schema.SPECTRAL,
                f"{schema.CHANGED_PREFIX}/p0001", f"{schema.ROWS_PREFIX}/p0001", f"{schema.COLS_PREFIX}/p0001",
                f"{schema.PREVIEW_PREFIX}/p0001"}


def cli_run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("array", ARRAYS)
def test_damaged_chunk(tmp_path, intact, capsys, array, damage):
    path = tmp_path / "run"
    shutil.copytree(intact, path, symlinks=True)
    target = chunk(path, array, LAST)
    damage(target)
    named = str(target.relative_to(path))

    with pytest.raises(StoreDamagedError) as info:
        read_everything(path)
    assert "\n" not in str(info.value) and (named in str(info.value) or array in str(info.value)), str(info.value)

    code, out, err = cli_run(capsys, "inspect", str(path))
    assert_one_line_error(code, err, "")
    assert out == ""

    code, out, err = cli_run(capsys, "summary", str(path))
    if array in SUMMARY_READS or damage is missing or code != 0:
        assert_one_line_error(code, err, "")
        assert out == ""
    else:  # summary does not read this file: its numbers are the intact store's
        # (the first line says how long ago the run was written: seconds tick)
        assert out.splitlines()[1:] == cli_run(capsys, "summary", str(intact))[1].splitlines()[1:]

    if array in RESUME_READS or damage is missing:
        with pytest.raises(StoreDamagedError):
            RunWriter.open_existing(path).resume(SNAPSHOTS, event={"step": SNAPSHOTS})
        assert open_run(path, check=False).status == "finished"  # refused untouched


@pytest.mark.parametrize(
    "content,needle",
    [
        ("[]", "holds a JSON list, not an object"),
        ('{"snapshots": -3, "last_step": 6, "status": "finished"}', "'snapshots' is -3"),
        ('{"snapshots": "6", "last_step": 6}', "'snapshots' is '6'"),
        ('{"snapshots": 6, "last_step": 6.5}', "'last_step' is 6.5"),
        ('{"snapshots": 6, "last_step": 6, "gaps": {"a": 1}}', "'gaps' is not a list"),
        ('{"snapshots": 60, "last_step": 60, "status": "finished"}', "says 60 snapshots, but"),
        ('{"snapshots": 6, "last_step": 6, "heartbeat": "soon"}', "'heartbeat' is 'soon'"),
        ('{"snaps', "not valid JSON"),
    ],
)
def test_damaged_commit_file(tmp_path, intact, capsys, content, needle):
    path = tmp_path / "run"
    shutil.copytree(intact, path)
    (path / schema.COMMIT_FILE).write_text(content)
    with pytest.raises(StoreDamagedError, match=re.escape(needle)):
        read_everything(path)
    for command in ("summary", "inspect"):
        code, out, err = cli_run(capsys, command, str(path))
        assert_one_line_error(code, err, needle)
        assert out == ""
    with pytest.raises(StoreDamagedError, match=re.escape(needle)):
        RunWriter.open_existing(path).resume(6, event={"step": 6})


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda meta: meta["attributes"].update(params={"p0000": 1}), "'params' is dict"),
        (lambda meta: meta["attributes"]["params"][0].update(shape=[40000, 50000]), "shape (6, 135), but"),
        (lambda meta: meta["attributes"]["params"][0].update(shape=[4_000_000, 5_000_000]), "beyond any model"),
        (lambda meta: meta["attributes"]["params"][1].update(shape=[-64, 48]), "not two sizes >= 0"),
    ],
)
def test_damaged_root_metadata(tmp_path, intact, capsys, edit, needle):
    path = tmp_path / "run"
    shutil.copytree(intact, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta.pop("consolidated_metadata", None)
    edit(meta)
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreDamagedError, match=re.escape(needle)):
        read_everything(path)
    for command in ("summary", "inspect"):
        code, out, err = cli_run(capsys, command, str(path))
        assert_one_line_error(code, err, needle)


def test_metadata_symlink_loop_and_wrong_type(tmp_path, intact, capsys):
    loop = tmp_path / "loop"
    shutil.copytree(intact, loop)
    (loop / schema.COMMIT_FILE).unlink()
    os.symlink(schema.COMMIT_FILE, loop / schema.COMMIT_FILE)
    code, _, err = cli_run(capsys, "summary", str(loop))
    assert_one_line_error(code, err, "commit.json cannot be read")
    wrong = tmp_path / "wrong"
    shutil.copytree(intact, wrong)
    (wrong / "zarr.json").write_text("[1, 2]")
    code, _, err = cli_run(capsys, "inspect", str(wrong))
    assert_one_line_error(code, err, "zarr.json")


def test_debug_shows_the_traceback(tmp_path, intact, capsys):
    path = tmp_path / "run"
    shutil.copytree(intact, path)
    (path / schema.COMMIT_FILE).write_text("[]")
    with pytest.raises(StoreDamagedError):
        cli.main(["--debug", "summary", str(path)])


def test_intact_store_verifies(intact, capsys):
    code, out, err = cli_run(capsys, "inspect", str(intact))
    assert code == 0, err
    assert f"integrity: sound: {SNAPSHOTS} snapshot(s) x {len(SHAPES)} matrices decoded and checked" in out
    read_everything(intact)


def test_mask_inconsistent_with_its_count_is_damage(tmp_path, intact, capsys):
    """A chunk that decodes but holds another snapshot's mask (what two writers produced) is caught."""
    path = tmp_path / "run"
    shutil.copytree(intact, path)
    # Snapshot 3's payload and frame headers replaced by snapshot 2's (valid chunks, wrong place),
    # through zarr itself: several snapshots may share a chunk file.
    for name in (f"{schema.CHANGED_PREFIX}/p0000", schema.FRAMES):
        array = zarr.open_array(str(path / name), mode="r+")
        array[3] = array[2]
    with pytest.raises(StoreDamagedError, match="snapshot 3"):
        read_everything(path)
    code, _, err = cli_run(capsys, "inspect", str(path))
    assert_one_line_error(code, err, "snapshot 3")
