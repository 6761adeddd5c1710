"""The post-hoc reading layer: safetensors (single, sharded, fp32/bf16), PEFT merges, steps, roles, refusals."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from compass_monitor.checkpoints import (  # noqa: E402
    CheckpointError,
    CheckpointMismatchError,
    UnsupportedFormatError,
    discover_series,
    open_checkpoint,
    resolve_path,
    resolve_steps,
)
from compass_monitor.checkpoints.safetensors_source import SafetensorsSource  # noqa: E402
from compass_monitor.checkpoints.series import check_series  # noqa: E402
from compass_monitor.checkpoints.tensor_specs import natural_key, specs_from_shapes  # noqa: E402
from compass_monitor.config import MonitorConfig  # noqa: E402
from compass_monitor.selection import select_parameters  # noqa: E402


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def save(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sharded", [False, True])
def test_reads_every_tensor_bit_exact(tmp_path, dtype, sharded):
    model = tiny_llama(dtype=dtype)
    folder = save(model, tmp_path / "m", max_shard_size="10KB" if sharded else "5GB")
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    source = open_checkpoint(folder)
    assert isinstance(source, SafetensorsSource)
    if sharded:
        assert len(source.files) >= 2
    state = model.state_dict()
    assert set(source.names()) == set(state)
    for name, tensor in state.items():
        assert source.shape(name) == tuple(tensor.shape)
        assert source.dtype(name) == {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
        assert_same_bits(source.load(name), tensor)
    assert source.model_type == "llama" and source.architectures == ("LlamaForCausalLM",)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = save(tiny_llama(), tmp_path / "m", max_shard_size="10KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name) + r".*\(1\)"):
        open_checkpoint(folder)


def test_roles_from_names_match_the_live_selection():
    """Names and shapes alone give the live monitor's roles, module types, layers and shapes (real BertModel, tiny Llama)."""
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, max_position_embeddings=16))
    config = MonitorConfig(include_embeddings=True, include_lm_head=True, include_norms=True, include_biases=True)
    for model in (bert, tiny_llama()):
        state = model.state_dict()
        specs = specs_from_shapes({n: tuple(t.shape) for n, t in state.items()}, {n: "F32" for n in state}, config)
        live = {spec for spec, _ in select_parameters(model, config)}
        assert set(specs) == live
        assert [s.name for s in specs] == sorted((s.name for s in specs), key=natural_key)
    llama = {s.name: s for s in specs}
    assert llama["model.layers.1.self_attn.k_proj.weight"].module_type == "k"
    assert llama["model.layers.1.self_attn.k_proj.weight"].shape == (16, 32)
    assert llama["lm_head.weight"].role == "lm_head" and llama["model.embed_tokens.weight"].role == "embedding"


def test_natural_order_puts_layer_2_before_layer_10():
    names = ["layers.10.q.weight", "layers.2.q.weight", "layers.1.q.weight"]
    assert sorted(names, key=natural_key) == ["layers.1.q.weight", "layers.2.q.weight", "layers.10.q.weight"]


# -- PEFT -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_merges_like_merge_and_unload(tmp_path, dtype, rslora):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=1, dtype=dtype)
    save(base, tmp_path / "base")
    lora = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
        init_lora_weights=False, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 5},
    )
    wrapped = peft.get_peft_model(tiny_llama(seed=1, dtype=dtype), lora)
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload().state_dict()
    base_source = open_checkpoint(tmp_path / "base")
    source = open_checkpoint(tmp_path / "adapter", base=base_source)
    adapted = 0
    for name in base_source.names():
        expected = merged[name]
        got = source.load(name)
        assert_same_bits(got, expected)
        adapted += not torch.equal(got, base_source.load(name))
    assert adapted == 2 * 3  # q, v, down in each of the 2 layers


def test_adapter_needs_its_base_and_refuses_dora_and_pickles(tmp_path):
    peft = pytest.importorskip("peft")
    save(tiny_llama(), tmp_path / "base")
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="PEFT adapter folder; it needs its base model"):
        open_checkpoint(tmp_path / "adapter")
    base = open_checkpoint(tmp_path / "base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UnsupportedFormatError, match="DoRA"):
        open_checkpoint(tmp_path / "adapter", base=base)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter" / "adapter_model.safetensors").rename(tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(UnsupportedFormatError, match="adapter_model.bin; compass-monitor never unpickles"):
        open_checkpoint(tmp_path / "adapter", base=base)


def test_adapter_over_the_wrong_base_names_the_tensors(tmp_path):
    peft = pytest.importorskip("peft")
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24))
    save(bert, tmp_path / "bert")
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"adapts tensors the base .* does not have: model\.layers\.0\.self_attn\.q_proj\.weight.*\(2\)"):
        open_checkpoint(tmp_path / "adapter", base=open_checkpoint(tmp_path / "bert"))


# -- refusals: nothing is ever unpickled ------------------------------------------------------------------------


class _Bomb:
    """A pickle that creates a file when unpickled: proof that refusal never loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["pytorch_model.bin"], r"holds pickled weights \(pytorch_model\.bin\); compass-monitor never unpickles files.*save_pretrained"),
        (["model.pt"], r"holds pickled weights \(model\.pt\)"),
        (["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"], r"verl FSDP checkpoint.*python -m verl\.model_merger merge --backend fsdp --local_dir"),
        ([".metadata", "__0_0.distcp"], r"torch\.distributed\.checkpoint \(DCP\) folder.*never unpickles.*verl\.model_merger"),
        (["notes.txt"], r"holds no weights compass-monitor can read"),
    ],
)
def test_pickle_formats_are_refused_unread(tmp_path, files, message):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(pickle.dumps(_Bomb(marker)))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(folder)
    assert not marker.exists()


def test_a_corrupt_safetensors_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors as safetensors"):
        open_checkpoint(tmp_path)


# -- series checks -----------------------------------------------------------------------------------------------


def test_missing_extra_and_resized_tensors_are_listed_by_name(tmp_path):
    from safetensors.torch import save_file

    state = {f"layers.{i}.mlp.up_proj.weight": torch.zeros(4, 3) for i in range(8)}
    save_file(state, tmp_path / "base.safetensors")
    fewer = {k: v for k, v in state.items() if not k.startswith(("layers.6.", "layers.7."))} | {"extra.weight": torch.zeros(2, 2)}
    save_file(fewer, tmp_path / "fewer.safetensors")
    resized = {k: torch.zeros(5, 3) for k in state}
    save_file(resized, tmp_path / "resized.safetensors")
    base, config = open_checkpoint(tmp_path / "base.safetensors"), MonitorConfig()
    with pytest.raises(CheckpointMismatchError, match=r"missing 'layers\.6\.mlp\.up_proj\.weight', 'layers\.7\.mlp\.up_proj\.weight' \(2\); extra 'extra\.weight' \(1\)"):
        check_series(base, [open_checkpoint(tmp_path / "fewer.safetensors")], config)
    with pytest.raises(CheckpointMismatchError, match=r"shape differs.*layers\.0\.mlp\.up_proj\.weight \(5, 3\) vs \(4, 3\).* and 3 more \(8\)"):
        check_series(base, [open_checkpoint(tmp_path / "resized.safetensors")], config)


def test_mixed_architectures_are_refused(tmp_path):
    save(tiny_llama(), tmp_path / "a")
    save(tiny_llama(), tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(CheckpointMismatchError, match=r"different architecture.*model_type 'mistral' vs 'llama'"):
        check_series(open_checkpoint(tmp_path / "a"), [open_checkpoint(tmp_path / "b")], MonitorConfig())


# -- steps and model ids ------------------------------------------------------------------------------------------


def test_steps_from_trainer_state_folder_name_or_explicit(tmp_path):
    for n in (10, 2, 30):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-30" / "trainer_state.json").write_text(json.dumps({"global_step": 31}))
    (tmp_path / "other").mkdir()
    paths = discover_series(tmp_path)
    assert [p.name for p in paths] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    refs = resolve_steps(paths)
    assert [(r.step, r.step_from) for r in refs] == [(2, "folder name"), (10, "folder name"), (31, "trainer_state.json")]
    assert [r.step for r in resolve_steps(paths, [5, 6, 7])] == [5, 6, 7]
    with pytest.raises(CheckpointError, match="--steps gives 2 steps for 3 checkpoints"):
        resolve_steps(paths, [1, 2])
    with pytest.raises(CheckpointError, match="steps must increase"):
        resolve_steps(list(reversed(paths)))
    with pytest.raises(CheckpointError, match=r"training step of .*other is unknown.*--steps"):
        resolve_steps([tmp_path / "other"])
    with pytest.raises(CheckpointError, match="no checkpoint-N sub-folders"):
        discover_series(tmp_path / "other")


def test_model_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    save(tiny_llama(), snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_path("acme/tiny") == snapshot
    assert open_checkpoint("acme/tiny").model_type == "llama"
    with pytest.raises(CheckpointError, match=r"'acme/absent' is not in the local Hugging Face cache.*huggingface-cli download acme/absent"):
        resolve_path("acme/absent")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_path(str(tmp_path / "nowhere" / "x" / "y"))
