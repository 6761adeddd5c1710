"""A monitored parameter replaced mid-run is followed (same shape) or stops the monitor with a message (new shape).

Real modules, trained with AdamW: a tiny Llama built locally (transformers),
its weights replaced the ways training code does it (``param.data = ...``,
module surgery, ``load_state_dict(assign=True)``, ``parametrize``,
``resize_token_embeddings``). Every stored mask is checked against an
independent numpy recomputation: bf16 round-to-nearest-even of the live
weights at each snapshot against W0, compared as float64 values (so -0 == +0
and NaN is changed). Wrappers that legitimately move parameters in the module
tree (``torch.compile``, activation checkpointing applied after the monitor
was created) must not be flagged.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig, open_run

pytest.importorskip("transformers")

VOCAB = 64
HIDDEN = 64


def _llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _bf16_values(t: torch.Tensor) -> np.ndarray:
    """bf16 round-to-nearest-even of float32 values, as float64 (numpy only; NaN stays NaN)."""
    x = t.detach().to(torch.float32).cpu().numpy()
    u = x.view(np.uint32).astype(np.uint64)
    code = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    out = (code.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    out[np.isnan(x)] = np.nan
    return out.reshape(x.shape) if x.ndim == 2 else out.reshape(1, -1)


class Recorder:
    """W0 of every monitored matrix at the monitor's creation, and the expected mask at every snapshot."""

    def __init__(self, model: nn.Module, monitor: CompassMonitor, *, strip: str = "") -> None:
        self.model, self.strip = model, strip
        self.names = [s.name for s in monitor.specs]
        live = self.live()
        self.w0 = {name: _bf16_values(live[name]) for name in self.names}
        self.expected: list[tuple[int, dict[str, np.ndarray]]] = []

    def live(self) -> dict[str, torch.Tensor]:
        """The weights the model computes with, by the unwrapped model's names (a parametrized one: its value)."""
        from torch.nn.utils import parametrize

        out = {name.replace(self.strip, "") if self.strip else name: p for name, p in self.model.named_parameters()}
        for prefix, module in self.model.named_modules():
            for tensor_name in getattr(module, "parametrizations", {}):
                if parametrize.is_parametrized(module, tensor_name):
                    out[f"{prefix}.{tensor_name}"] = getattr(module, tensor_name)
        return out

    def record(self, step: int, names: list[str] | None = None) -> None:
        live = self.live()
        masks = {}
        for name in names or self.names:
            current = _bf16_values(live[name])
            masks[name] = current != self.w0[name] if current.shape == self.w0[name].shape else None
        self.expected.append((step, masks))

    def check(self, run_dir) -> int:
        """Every stored snapshot's masks and counts against the expectation; returns the number checked."""
        run = open_run(run_dir)
        steps = list(run.steps)
        assert steps == [step for step, _ in self.expected], (steps, [s for s, _ in self.expected])
        changed = run.count("changed")
        for t, (step, masks) in enumerate(self.expected):
            for name, mask in masks.items():
                p = run.param(name)
                stored = run.mask(name, t)
                assert mask is not None, f"{name} changed shape but step {step} was stored"
                assert stored.shape == mask.shape
                bad = int((stored != mask).sum())
                assert bad == 0, f"step {step}: {name}: stored mask differs from the live weights vs W0 at {bad} of {mask.size} weights (stored |M|={int(stored.sum())}, live |M|={int(mask.sum())})"
                assert changed[t, run.params.index(p)] == int(mask.sum())
                np.testing.assert_array_equal(run.row_counts(name)[t], mask.sum(axis=1))
                np.testing.assert_array_equal(run.col_counts(name)[t], mask.sum(axis=0))
        return len(self.expected)


def _batches(steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(steps)]


def _train(model, optimizer, monitor, recorder, steps: int, *, seed: int, forward=None) -> None:
    forward = model if forward is None else forward
    for ids in _batches(steps, seed):
        out = forward(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        monitor.on_optimizer_step()
        if monitor.enabled and monitor.step % monitor.config.every_n_steps == 0:
            recorder.record(monitor.step)


def _monitor_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("compass_monitor") and r.levelno >= logging.WARNING]


CONFIG = MonitorConfig(every_n_steps=2, principal_rank=4, writer_queue=0)
Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"


def test_same_shape_replacements_are_followed(tmp_path, caplog):
    """``param.data = ...``, a replaced module, ``load_state_dict(assign=True)`` and a parametrization:
    every stored mask equals the live weights vs W0 (the old tensors are no longer measured)."""
    caplog.set_level(logging.INFO, logger="compass_monitor")
    model = _llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    monitor = CompassMonitor(model, tmp_path / "run", config=CONFIG, optimizer=optimizer)
    recorder = Recorder(model, monitor)
    w0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, optimizer, monitor, recorder, 4, seed=1)
    assert _monitor_warnings(caplog) == []

    # 1. param.data = a new tensor of the same shape (here W0 itself): the same Parameter, new storage.
    q = model.model.layers[0].self_attn.q_proj
    q.weight.data = w0[Q0].clone()
    # 2. module surgery: a new Linear holding W0, trained from here on.
    old = model.model.layers[1].mlp.down_proj
    new = nn.Linear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(w0[DOWN1])
    model.model.layers[1].mlp.down_proj = new
    optimizer.add_param_group({"params": list(new.parameters())})
    # 3. load_state_dict(assign=True): the module's Parameter object is replaced by a new one.
    v = model.model.layers[1].self_attn.v_proj
    v.load_state_dict({"weight": w0[V1].clone()}, assign=True)
    optimizer.add_param_group({"params": [v.weight]})
    caplog.clear()
    _train(model, optimizer, monitor, recorder, 4, seed=2)
    replaced = _monitor_warnings(caplog)

    # 4. a parametrization: the measured matrix is the parametrized (effective) weight.
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, x):
            return 1.5 * x

    o = model.model.layers[0].self_attn.o_proj
    parametrize.register_parametrization(o, "weight", Scale())
    caplog.clear()
    _train(model, optimizer, monitor, recorder, 2, seed=3)
    parametrized = _monitor_warnings(caplog)
    monitor.close()
    assert monitor.disabled_reason is None
    assert recorder.check(tmp_path / "run") == 5
    assert open_run(tmp_path / "run").status == "finished"
    for name in (Q0, DOWN1, V1):
        assert sum(name in w for w in replaced) == 1, (name, replaced)
    assert sum(O0 in w for w in parametrized) == 1, parametrized


def test_replacement_before_training_again_is_not_frozen(tmp_path):
    """The issue's case: a replaced module holding W0 reads |M| = 0, not the old tensor's frozen count."""
    model = _llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    monitor = CompassMonitor(model, tmp_path / "run", config=CONFIG, optimizer=optimizer)
    w0 = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    recorder = Recorder(model, monitor)
    _train(model, optimizer, monitor, recorder, 2, seed=1)
    new = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)
    with torch.no_grad():
        new.weight.copy_(w0)
    model.model.layers[1].mlp.down_proj = new  # not in the optimizer: it keeps W0
    _train(model, optimizer, monitor, recorder, 1, seed=2)
    monitor.close()  # snapshots step 3
    run = open_run(tmp_path / "run")
    assert run.mask(DOWN1, 0).sum() > 0
    assert run.mask(DOWN1, 1).sum() == 0


@pytest.mark.parametrize("how", ["resize_token_embeddings", "surgery", "data"])
def test_shape_change_stops_the_monitor_with_a_message(tmp_path, caplog, how):
    """A monitored matrix whose shape changes: one message naming it, its old and new shapes and what to do;
    training continues; the committed snapshots (every matrix) are correct."""
    caplog.set_level(logging.INFO, logger="compass_monitor")
    model = _llama()
    config = MonitorConfig(every_n_steps=2, principal_rank=4, writer_queue=0, include_embeddings=True, include_lm_head=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    monitor = CompassMonitor(model, tmp_path / "run", config=config, optimizer=optimizer)
    names = [s.name for s in monitor.specs]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    recorder = Recorder(model, monitor)
    _train(model, optimizer, monitor, recorder, 4, seed=1)
    caplog.clear()
    if how == "resize_token_embeddings":
        model.resize_token_embeddings(VOCAB + 8)
        name, old_shape, new_shape = "model.embed_tokens.weight", (VOCAB, HIDDEN), (VOCAB + 8, HIDDEN)
    elif how == "surgery":
        mlp = model.model.layers[0].mlp
        mlp.up_proj = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        mlp.gate_proj = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        mlp.down_proj = nn.Linear(3 * HIDDEN, HIDDEN, bias=False)
        name, old_shape, new_shape = "model.layers.0.mlp.gate_proj.weight", (2 * HIDDEN, HIDDEN), (3 * HIDDEN, HIDDEN)
    else:  # the same Parameter objects, new storage of another shape
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight.data = torch.randn(3 * HIDDEN, HIDDEN) * 0.02
        mlp.up_proj.weight.data = torch.randn(3 * HIDDEN, HIDDEN) * 0.02
        mlp.down_proj.weight.data = torch.randn(HIDDEN, 3 * HIDDEN) * 0.02
        name, old_shape, new_shape = "model.layers.0.mlp.gate_proj.weight", (2 * HIDDEN, HIDDEN), (3 * HIDDEN, HIDDEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before = monitor.step
    _train(model, optimizer, monitor, recorder, 4, seed=2)  # never raises
    assert monitor.step == before + 2  # disabled at the first snapshot after the change (step 6)
    assert not monitor.enabled
    messages = [w for w in _monitor_warnings(caplog) if name in w]
    assert len(messages) == 1, _monitor_warnings(caplog)
    message = messages[0]
    assert str(old_shape) in message and str(new_shape) in message, message
    assert "new CompassMonitor" in message and "\n" not in message
    monitor.close()
    run = open_run(tmp_path / "run")
    assert run.status == "disabled"
    assert name in run.history[-1].get("reason", "")
    assert recorder.check(tmp_path / "run") == 2  # the snapshots before the change: every matrix correct


def test_default_selection_ignores_a_resized_embedding(tmp_path, caplog):
    """Embeddings and lm_head are not monitored by default: resize_token_embeddings leaves the monitor measuring."""
    caplog.set_level(logging.INFO, logger="compass_monitor")
    model = _llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    monitor = CompassMonitor(model, tmp_path / "run", config=CONFIG, optimizer=optimizer)
    assert all(s.role == "linear" for s in monitor.specs)
    recorder = Recorder(model, monitor)
    _train(model, optimizer, monitor, recorder, 2, seed=1)
    model.resize_token_embeddings(VOCAB + 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    _train(model, optimizer, monitor, recorder, 2, seed=2)
    monitor.close()
    assert monitor.disabled_reason is None
    assert _monitor_warnings(caplog) == []
    assert recorder.check(tmp_path / "run") == 2


@pytest.mark.parametrize("wrap", ["compile_after", "compile_before", "checkpoint_after", "hf_gradient_checkpointing"])
def test_wrappers_are_not_flagged(tmp_path, caplog, wrap):
    """torch.compile and activation checkpointing (wrapped before or after the monitor) raise no false alarm."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing, checkpoint_wrapper
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    caplog.set_level(logging.INFO, logger="compass_monitor")
    model = _llama()
    forward = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    watched = torch.compile(model, backend="eager") if wrap == "compile_before" else model
    monitor = CompassMonitor(watched, tmp_path / "run", config=CONFIG, optimizer=optimizer)
    if wrap == "compile_before":
        forward = watched
    elif wrap == "compile_after":
        forward = torch.compile(model, backend="eager")
    elif wrap == "checkpoint_after":
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
        assert "_checkpoint_wrapped_module" in "".join(n for n, _ in model.named_modules())
    else:
        model.gradient_checkpointing_enable()
        model.train()
    # the names of the unwrapped model (apply_activation_checkpointing inserts a component)
    recorder = Recorder(model, monitor, strip="._checkpoint_wrapped_module" if wrap == "checkpoint_after" else "")
    _train(model, optimizer, monitor, recorder, 4, seed=1, forward=forward)
    monitor.close()
    assert monitor.disabled_reason is None
    assert _monitor_warnings(caplog) == []
    assert recorder.check(tmp_path / "run") == 2


def _fsdp2_run(rank: int, world: int, root: str) -> dict:
    """FSDP2 on gloo: the DTensor shards are checked; FSDP2's own swaps (unsharded parameters left registered
    after backward by ``set_reshard_after_backward(False)``, then resharded) raise nothing."""
    from pathlib import Path

    import dist_helpers as H
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from compass_monitor.integrations.pytorch import attach_optimizer

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("compass_monitor").addHandler(Keep(level=logging.WARNING))
    model = H.shard_fsdp2(H.make_model())
    monitor = CompassMonitor(model, Path(root) / "fsdp2", config=MonitorConfig(every_n_steps=2, principal_rank=3))
    checked = sum(b.dtensor for b in monitor.probe.bindings.bindings)
    sharded = sum(isinstance(s.source, DTensor) for s in monitor.probe.layout.shards)
    optimizer = H.ExactAdam(model.parameters())
    attach_optimizer(monitor, optimizer)
    H.train_steps(model, optimizer, H.batches(4), rank=rank)
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_backward(False)
    H.train_steps(model, optimizer, H.batches(2, seed=5), rank=rank)  # the snapshot of step 6 sees unsharded parameters
    unsharded_at_snapshot = not isinstance(model.layers[0].up_proj._parameters["weight"], DTensor)
    for m in fsdp_modules:
        m.set_reshard_after_backward(True)
        m.reshard()
    H.train_steps(model, optimizer, H.batches(2, seed=6), rank=rank)
    monitor.close()
    return {
        "checked": checked,
        "sharded": sharded,
        "unsharded_at_snapshot": unsharded_at_snapshot,
        "messages": [m for m in messages if "typed 'other'" not in m],
        "disabled": monitor.disabled_reason,
        "step": monitor.step,
    }


def test_fsdp2_is_not_flagged(tmp_path):
    import dist_helpers as H

    for result in H.spawn(_fsdp2_run, 2, str(tmp_path)):
        assert result["sharded"] > 0 and result["checked"] == result["sharded"], result
        assert result["unsharded_at_snapshot"], result
        assert result["disabled"] is None and result["step"] == 8, result
        assert result["messages"] == [], result
    assert list(open_run(tmp_path / "fsdp2").steps) == [2, 4, 6, 8]


class _CanonicalRecorder(Recorder):
    """GPT-2: every monitored matrix as (out, in), fused c_attn split by the recorded rows (its own reading of the specs)."""

    def __init__(self, model: nn.Module, monitor: CompassMonitor) -> None:
        self.specs = {s.name: s for s in monitor.specs}
        super().__init__(model, monitor)

    def live(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out = {}
        for name, spec in self.specs.items():
            w = params[spec.extra["source"]].detach()
            w = w.t() if spec.extra.get("layout") == "in_out" else w
            rows = spec.extra.get("rows")
            out[name] = torch.cat([w[a:b] for a, b in rows]) if rows else w
        return out


def test_replaced_fused_conv1d_is_followed(tmp_path, caplog):
    """A replaced transformers Conv1D holding a fused q/k/v (three monitored matrices, transposed, split by rows)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    caplog.set_level(logging.INFO, logger="compass_monitor")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    monitor = CompassMonitor(model, tmp_path / "run", config=CONFIG, optimizer=optimizer)
    recorder = _CanonicalRecorder(model, monitor)
    attn = model.transformer.h[0].attn
    w0 = attn.c_attn.weight.detach().clone()
    _train(model, optimizer, monitor, recorder, 2, seed=1)
    new = Conv1D(w0.shape[1], w0.shape[0])
    with torch.no_grad():
        new.weight.copy_(w0)
        new.bias.copy_(attn.c_attn.bias)
    attn.c_attn = new
    optimizer.add_param_group({"params": list(new.parameters())})
    caplog.clear()
    _train(model, optimizer, monitor, recorder, 4, seed=2)
    warnings = _monitor_warnings(caplog)
    monitor.close()
    assert monitor.disabled_reason is None
    assert recorder.check(tmp_path / "run") == 3
    assert len(warnings) == 1 and all(f"transformer.h.0.attn.c_attn.weight[{part}]" in warnings[0] for part in "qkv"), warnings
