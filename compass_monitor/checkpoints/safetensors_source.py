"""Tensor-by-tensor, memory-mapped reading of Hugging Face safetensors checkpoints.

A checkpoint folder holds either one ``model.safetensors`` (or any single
``*.safetensors`` file), or shards listed by ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``, as ``save_pretrained`` writes
with ``max_shard_size``). Each file is opened once with
``safetensors.safe_open(..., framework="pt")``, which checks it and reads only
the header; shapes and dtypes come from the headers without reading any data.
:meth:`SafetensorsSource.load` reads one tensor's bytes (the header's
``data_offsets``) with a plain file read into a fresh tensor, not through the
memory map: pages read through a map stay resident in the process (its RSS
grows by every tensor read until the map closes, a whole model over a pass),
while a read leaves them only in the kernel's page cache. Reading a model
then costs the memory of its largest tensor, not of the model.

Pickle formats (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) and
torch.distributed.checkpoint folders (``.metadata`` + ``*.distcp``) are refused
with a message saying how to convert them: compass-monitor never unpickles a file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, UnsupportedFormatError

__all__ = ["SafetensorsSource", "refuse_pickle", "read_json", "read_tensor", "INDEX_NAME"]

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONVERT = (
    "convert it to safetensors first, from a trusted copy: python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('IN').save_pretrained('OUT')\" (save_pretrained writes safetensors)"
)
_VERL = (
    "merge it into a Hugging Face safetensors folder with verl's model merger: "
    "python -m verl.model_merger merge --backend fsdp --local_dir {path} --target_dir {path}_hf"
)


_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _extents(file: Path) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
    """Tensor name -> (absolute start, stop, dtype, shape) from a safetensors header (8-byte length, then JSON)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base = 8 + size
    return {
        name: (base + int(info["data_offsets"][0]), base + int(info["data_offsets"][1]), str(info["dtype"]), tuple(int(d) for d in info["shape"]))
        for name, info in header.items()
        if name != "__metadata__"
    }


def read_tensor(file: Path, start: int, stop: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes ``[start, stop)`` of ``file`` as a new tensor (little-endian, as safetensors stores), read without a memory map."""
    if dtype not in _DTYPES:
        raise CheckpointError(f"{file}: tensor dtype {dtype} is not supported")
    buffer = torch.empty(stop - start, dtype=torch.uint8)
    with open(file, "rb", buffering=0) as f:
        f.seek(start)
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{file} ends inside a tensor (expected bytes {start}..{stop}); the file is truncated")
            done += got
    return buffer.view(_DTYPES[dtype]).reshape(shape)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a clear error when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return value


def refuse_pickle(folder: Path) -> None:
    """Raise :class:`UnsupportedFormatError` naming the pickle or DCP files in ``folder`` and how to convert them.

    Called when a folder holds no safetensors. Nothing is opened.
    """
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    if (folder / ".metadata").is_file() or any(name.endswith(".distcp") for name in files):
        raise UnsupportedFormatError(
            f"{folder} is a torch.distributed.checkpoint (DCP) folder (.metadata, *.distcp), which holds pickled data; "
            f"compass-monitor never unpickles files. For a verl checkpoint, {_VERL.format(path=folder)}; otherwise "
            "torch.distributed.checkpoint.format_utils.dcp_to_torch_save on a trusted copy, then load and save_pretrained it"
        )
    pickles = [name for name in files if name.endswith(_PICKLE_SUFFIXES)]
    if any(name.startswith("model_world_size_") for name in pickles):
        raise UnsupportedFormatError(
            f"{folder} is a verl FSDP checkpoint ({pickles[0]}, pickled); compass-monitor never unpickles files: "
            + _VERL.format(path=folder)
        )
    if pickles:
        raise UnsupportedFormatError(
            f"{folder} holds pickled weights ({', '.join(pickles[:3])}); compass-monitor never unpickles files: {_CONVERT}"
        )
    raise CheckpointError(
        f"{folder} holds no weights compass-monitor can read (no *.safetensors, no {INDEX_NAME}, no adapter_config.json); "
        "give a Hugging Face model folder saved with save_pretrained"
    )


class SafetensorsSource:
    """The tensors of one safetensors checkpoint (a file, or a folder of one file or of indexed shards).

    Args:
        path: a ``*.safetensors`` file or a folder holding them.

    Raises:
        UnsupportedFormatError: the folder holds only pickle or DCP files.
        CheckpointError: no weights, an index naming a missing shard, or a tensor in two files.
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if self.path.is_file():
            files = [self.path]
            folder = self.path.parent
        elif self.path.is_dir():
            folder = self.path
            files = self._files(folder)
        else:
            raise CheckpointError(f"checkpoint {self.path} does not exist")
        self.folder = folder
        self.files = files
        self._handles = []
        self._where: dict[str, Any] = {}
        self._extent: dict[str, tuple[Path, int, int, str, tuple[int, ...]]] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
                raise CheckpointError(f"cannot read {file} as safetensors: {exc}") from exc
            self._handles.append(handle)
            for name in handle.keys():
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} is stored twice in {folder} ({file.name} and another file)")
                self._where[name] = handle
            try:
                self._extent.update({name: (file, *extent) for name, extent in _extents(file).items()})
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise CheckpointError(f"cannot read {file} as safetensors: its header: {exc}") from exc
        config_path = folder / "config.json"
        self.config: dict[str, Any] = read_json(config_path) if config_path.is_file() else {}

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map; it is not a safetensors index")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing[:5])} ({len(missing)}); copy them or re-save the model")
            return [folder / n for n in names]
        files = sorted(p for p in folder.glob("*.safetensors") if p.name != "adapter_model.safetensors")
        if not files:
            refuse_pickle(folder)
        return files

    def names(self) -> list[str]:
        """Every tensor name, in the files' order."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (no data read)."""
        return tuple(int(d) for d in self._where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype name (``BF16``, ``F16``, ``F32``, ...), from the header."""
        return str(self._where[name].get_slice(name).get_dtype())

    def load(self, name: str) -> torch.Tensor:
        """The tensor as stored (its dtype and shape), read from its file into a new tensor (no memory map)."""
        return read_tensor(*self._extent[name])

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.config.get("architectures") or ())

    def close(self) -> None:
        """Drop the file handles (the memory maps close with them)."""
        self._handles.clear()
        self._where.clear()
        self._extent.clear()

    def __repr__(self) -> str:
        return f"SafetensorsSource({str(self.path)!r}, {len(self._where)} tensors in {len(self.files)} file(s))"
