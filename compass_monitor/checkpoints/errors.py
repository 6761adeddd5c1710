"""The errors of the post-hoc checkpoint reader, each a one-line message that says what to do."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CheckpointError", "UnsupportedFormatError", "CheckpointMismatchError", "listed"]


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read or does not fit the others (the message says why and what to do)."""


class UnsupportedFormatError(CheckpointError):
    """A checkpoint is in a format compass-monitor does not read (pickle, DCP); the message says how to convert."""


class CheckpointMismatchError(CheckpointError):
    """Two checkpoints do not hold the same tensors, shapes or architecture."""


def listed(names: Sequence[str], *, first: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more (7)``: the first few names of a list and its count, for messages."""
    shown = ", ".join(repr(n) for n in names[:first])
    rest = len(names) - first
    return f"{shown} and {rest} more ({len(names)})" if rest > 0 else f"{shown} ({len(names)})"
