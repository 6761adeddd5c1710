"""Live follow vs scrub: where the cursor sits on the snapshot axis (no Textual)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Timeline"]


@dataclass
class Timeline:
    """The selected snapshot of a growing run.

    While ``following``, new snapshots move the position to the latest one;
    any scrub (step, jump to start or end) pauses following until :meth:`follow`.
    """

    length: int = 0
    position: int = 0
    following: bool = True

    def grow(self, length: int) -> None:
        self.length = max(0, length)
        if self.following or self.position >= self.length:
            self.position = max(0, self.length - 1)

    def step(self, delta: int) -> None:
        self.following = False
        self.position = min(max(self.position + delta, 0), max(0, self.length - 1))

    def home(self) -> None:
        self.following = False
        self.position = 0

    def end(self) -> None:
        self.following = False
        self.position = max(0, self.length - 1)

    def follow(self) -> None:
        self.following = True
        self.position = max(0, self.length - 1)

    def seek(self, position: int) -> None:
        self.following = False
        self.position = min(max(position, 0), max(0, self.length - 1))

    @property
    def at_end(self) -> bool:
        return self.position >= self.length - 1
