"""Which folders are the checkpoints, and at which training step each was saved.

* A **run folder** (HF Trainer ``output_dir``) holds ``checkpoint-N/``
  sub-folders; they are taken in step order.
* A checkpoint's **step** is, in order of precedence: the one given explicitly
  (``--steps``), ``global_step`` from its ``trainer_state.json`` (HF Trainer),
  the ``N`` of a folder named ``checkpoint-N`` / ``global_step_N`` /
  ``step_N`` / ``step-N``; otherwise the user must give it.
* A **model id** (``org/name``) that is not a local path is resolved from the
  local Hugging Face cache (``huggingface_hub.snapshot_download(...,
  local_files_only=True)``, which honours ``HF_HOME`` / ``HF_HUB_CACHE``); the
  network is never used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

__all__ = ["CheckpointRef", "resolve_path", "discover_series", "resolve_steps", "step_of"]

_STEP_RE = re.compile(r"^(?:checkpoint|global_step|step)[-_](\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint and its training step.

    Attributes:
        path: the checkpoint folder (or ``.safetensors`` file).
        step: the optimizer step it was saved at.
        step_from: where the step came from (``--steps``, ``trainer_state.json``, ``folder name``).
    """

    path: Path
    step: int
    step_from: str


def resolve_path(ref: str | Path) -> Path:
    """A local checkpoint path for ``ref``: the path itself if it exists, else a model id looked up in the local HF cache.

    Raises:
        CheckpointError: neither a local path nor a model in the local cache (the message says how to get it there).
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    text = str(ref)
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", text) is None:
        raise CheckpointError(f"checkpoint {text!r} does not exist (not a folder, not a file, not an org/name model id)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError(f"{text!r} is not a local path, and huggingface_hub is not installed to look it up in the cache") from exc
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"model {text!r} is not in the local Hugging Face cache and compass-monitor does not download; "
            f"fetch it first (huggingface-cli download {text}) or give its folder"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - hub raises several kinds for a malformed id or cache
        raise CheckpointError(f"cannot resolve model {text!r} from the local Hugging Face cache: {type(exc).__name__}: {exc}") from exc


def step_of(path: Path) -> tuple[int, str] | None:
    """``(step, where it came from)`` from ``trainer_state.json`` or the folder name; None if neither says."""
    state = path / "trainer_state.json" if path.is_dir() else None
    if state is not None and state.is_file():
        try:
            value = json.loads(state.read_text()).get("global_step")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {state}: {exc}") from exc
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, "trainer_state.json"
    match = _STEP_RE.match(path.name if path.is_dir() else path.parent.name)
    if match:
        return int(match.group(1)), "folder name"
    return None


def discover_series(run_folder: Path) -> list[Path]:
    """The ``checkpoint-N`` (or ``global_step_N``, ``step_N``) sub-folders of a run folder, by N.

    Raises:
        CheckpointError: no such sub-folder.
    """
    found = []
    for child in run_folder.iterdir() if run_folder.is_dir() else ():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    if not found:
        raise CheckpointError(f"{run_folder} has no checkpoint-N sub-folders; give the checkpoints themselves: diff BASE CKPT [CKPT ...]")
    return [path for _, path in sorted(found)]


def resolve_steps(paths: list[Path], steps: list[int] | None = None) -> list[CheckpointRef]:
    """Each checkpoint with its step, in the order given; steps must strictly increase.

    Raises:
        CheckpointError: a wrong number of explicit steps, a checkpoint whose step is unknown,
            or steps that do not increase.
    """
    if steps is not None and len(steps) != len(paths):
        raise CheckpointError(f"--steps gives {len(steps)} steps for {len(paths)} checkpoints; give one step per checkpoint")
    refs = []
    for i, path in enumerate(paths):
        if steps is not None:
            refs.append(CheckpointRef(path, int(steps[i]), "--steps"))
            continue
        found = step_of(path)
        if found is None:
            raise CheckpointError(
                f"the training step of {path} is unknown (no trainer_state.json, not named checkpoint-N); "
                "give the steps explicitly: --steps N [N ...]"
            )
        refs.append(CheckpointRef(path, found[0], found[1]))
    for earlier, later in zip(refs, refs[1:]):
        if later.step <= earlier.step:
            raise CheckpointError(
                f"checkpoint steps must increase: {later.path} is at step {later.step} ({later.step_from}) after "
                f"{earlier.path} at step {earlier.step} ({earlier.step_from}); order the checkpoints or fix --steps"
            )
    if refs and refs[0].step < 1:
        raise CheckpointError(f"checkpoint {refs[0].path} is at step {refs[0].step}; steps start at 1 (the base is step 0)")
    return refs
