"""The post-hoc driver on tiny real architectures: bounded memory, sharded bf16, PEFT, fp16, exact counts."""

from __future__ import annotations

import gc
import logging
import re
import weakref

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compass_monitor.checkpoints import diff_checkpoints, resolve_steps  # noqa: E402
from compass_monitor.checkpoints import layout as layout_module  # noqa: E402
from compass_monitor.config import MonitorConfig  # noqa: E402
from compass_monitor.store import open_run  # noqa: E402

CONFIG = MonitorConfig(principal_rank=2, snapshot_on_close=False)


def tiny_qwen2(seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(config).to(dtype).eval()


def perturb(model, scale: float, seed: int):
    """Every 2-D weight moved by ``scale`` * N(0, 1) on a random half of its entries (in place, in its dtype)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                keep = torch.rand(p.shape, generator=gen) < 0.5
                p.add_((scale * torch.randn(p.shape, generator=gen) * keep).to(p.dtype))
    return model


def exact_changed(a: torch.Tensor, b: torch.Tensor) -> int:
    """Float64-free reference: bf16 roundings differ, +0 == -0 (Def. 2.1)."""
    x, y = a.to(torch.bfloat16).view(torch.int16).to(torch.int32), b.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    return int(((x != y) & (((x | y) & 0x7FFF) != 0)).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_counts_equal_an_independent_comparison_sharded(tmp_path, dtype, caplog):
    base = tiny_qwen2(0, dtype)
    base.save_pretrained(tmp_path / "base", max_shard_size="10KB")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for step in (5, 10):
        perturb(base, 3e-3, step).save_pretrained(tmp_path / f"checkpoint-{step}", max_shard_size="10KB")
        if step == 5:
            mid = {k: v.clone() for k, v in base.state_dict().items()}
    assert (tmp_path / "checkpoint-10" / "model.safetensors.index.json").is_file()
    refs = resolve_steps([tmp_path / "checkpoint-5", tmp_path / "checkpoint-10"])
    with caplog.at_level(logging.WARNING):
        result = diff_checkpoints(tmp_path / "base", refs, tmp_path / "run", config=CONFIG, progress=False, device="cpu")
    assert ("fp16 tensors are rounded to bf16" in caplog.text) == (dtype == torch.float16)
    assert "is that the model these checkpoints were trained from" not in caplog.text
    run = open_run(tmp_path / "run")
    assert list(run.steps) == [5, 10] and run.attrs["run"]["model_class"] == "Qwen2ForCausalLM"
    final = base.state_dict()
    for p in run.params:
        assert p.role == "linear"
        assert run.counts[0, p.index, 0] == exact_changed(base_state[p.name], mid[p.name])
        assert run.counts[1, p.index, 0] == exact_changed(base_state[p.name], final[p.name])
        np.testing.assert_array_equal(run.base_codes(p).reshape(p.shape), base_state[p.name].to(torch.bfloat16).view(torch.int16).numpy())
    assert {p.module_type for p in run.params} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert len(result.specs) == 14


def test_at_most_two_checkpoint_matrices_are_alive_at_a_time(tmp_path, monkeypatch):
    """Peak memory is set by the largest matrix: of 14 matrices, at most the one measured and the next read are alive."""
    base = tiny_qwen2(0, torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    perturb(base, 3e-3, 1).save_pretrained(tmp_path / "checkpoint-1")
    alive: list[weakref.ref] = []
    most = [0]
    real_load = layout_module.CheckpointCursor.load

    def load(self, name):
        gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        most[0] = max(most[0], len(alive) + 1)
        tensor = real_load(self, name)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(layout_module.CheckpointCursor, "load", load)
    diff_checkpoints(tmp_path / "base", resolve_steps([tmp_path / "checkpoint-1"]), tmp_path / "run", config=CONFIG, progress=False, device="cpu")
    assert most[0] <= 2


def test_a_lora_adapter_folder_is_measured_as_its_merged_model(tmp_path):
    peft = pytest.importorskip("peft")
    tiny_qwen2(3, torch.bfloat16).save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(tiny_qwen2(3, torch.bfloat16), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload().state_dict()
    base = tiny_qwen2(3, torch.bfloat16).state_dict()
    diff_checkpoints(tmp_path / "base", resolve_steps([tmp_path / "adapter"], [50]), tmp_path / "run", config=CONFIG, progress=False, device="cpu")
    run = open_run(tmp_path / "run")
    for p in run.params:
        expected = exact_changed(base[p.name], merged[p.name])
        assert run.counts[0, p.index, 0] == expected
        assert (expected > 0) == (p.module_type in ("q", "up"))


def _median_cosine(base_dir, ckpt_dir, names) -> float:
    """Independent reference: float64 cosine of the flattened tensors, median over ``names``."""
    from safetensors.torch import load_file

    a, b = load_file(base_dir / "model.safetensors"), load_file(ckpt_dir / "model.safetensors")
    values = sorted(float(torch.nn.functional.cosine_similarity(a[n].double().reshape(1, -1), b[n].double().reshape(1, -1))) for n in names)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def test_a_base_of_another_run_is_refused_and_nothing_is_written(tmp_path, capsys):
    from compass_monitor.checkpoints.lineage import BaseMismatchError, sampled_tensors
    from compass_monitor.checkpoints.series import check_series, open_checkpoint
    from compass_monitor.cli import main

    tiny_qwen2(0, torch.bfloat16).save_pretrained(tmp_path / "base")
    tiny_qwen2(1, torch.bfloat16).save_pretrained(tmp_path / "checkpoint-7")  # same architecture, other weights
    names = sampled_tensors(check_series(open_checkpoint(tmp_path / "base"), [open_checkpoint(tmp_path / "checkpoint-7")], CONFIG))
    assert len(names) == 8  # of the 14 linear matrices
    expected = _median_cosine(tmp_path / "base", tmp_path / "checkpoint-7", names)
    assert abs(expected) < 0.05  # unrelated weights: near orthogonal
    (tmp_path / "out").mkdir()
    with pytest.raises(BaseMismatchError) as caught:
        diff_checkpoints(tmp_path / "base", resolve_steps([tmp_path / "checkpoint-7"]), tmp_path / "out", config=CONFIG, progress=False, device="cpu")
    assert str(caught.value) == (
        f"{tmp_path / 'checkpoint-7'} was not trained from the base {tmp_path / 'base'}: the median cosine between their weights over "
        f"8 sampled matrices is {expected:.3f} (a fine-tune stays near 1, unrelated models near 0; below 0.5 is refused); give the "
        "base these checkpoints were trained from, or pass --allow-unrelated-base to compare unrelated models anyway"
    )
    assert list((tmp_path / "out").iterdir()) == []  # nothing written
    args = ["diff", str(tmp_path / "base"), str(tmp_path / "checkpoint-7"), "--out", str(tmp_path / "cli"), "--rank", "2", "--no-progress"]
    capsys.readouterr()  # save_pretrained's progress lines
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compass-monitor diff: error:" in err and "was not trained from the base" in err
    assert not (tmp_path / "cli").exists()
    # On purpose: the flag compares them anyway (almost every weight differs).
    assert main(args + ["--allow-unrelated-base"]) == 0
    assert open_run(tmp_path / "cli").counts[0, :, 0].sum() > 0.99 * sum(p.numel for p in open_run(tmp_path / "cli").params)


def test_a_fine_tune_that_changes_every_bf16_weight_is_not_refused(tmp_path):
    """Adam at a usual learning rate changes nearly every bf16 code; the weights stay close (cosine ~ 1)."""
    base = tiny_qwen2(0, torch.float32)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(1e-3 * torch.sign(torch.randn_like(p)))  # one Adam-sized step on every weight
    base.save_pretrained(tmp_path / "checkpoint-1")
    diff_checkpoints(tmp_path / "base", resolve_steps([tmp_path / "checkpoint-1"]), tmp_path / "run", config=CONFIG, progress=False, device="cpu")
    run = open_run(tmp_path / "run")
    assert run.counts[0, :, 0].sum() > 0.99 * sum(p.numel for p in run.params)


def test_cosine_skips_zero_and_non_finite_tensors():
    from compass_monitor.checkpoints.lineage import cosine

    assert cosine(torch.zeros(4, 4), torch.ones(4, 4)) is None
    assert cosine(torch.full((2, 2), float("nan")), torch.ones(2, 2)) is None
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    assert cosine(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])) == pytest.approx(1.0, abs=1e-15)
