"""Modal dialogs: filter, run picker, help."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from ...store import ParamInfo
from ..data import MatrixFilter

__all__ = ["FilterScreen", "PickRunScreen", "HelpScreen", "help_text"]

FILTER_HELP = (
    "Tokens, all of which must hold:  q k v o gate up down (module types)   "
    "3 or L3 or 3-5 (layer range)   anything else: a regular expression on the name.\n"
    "Example: 'q k 10-12'  or  'mlp 0-3'.  Empty shows every matrix.  Enter applies, Esc cancels."
)


class FilterScreen(ModalScreen[MatrixFilter | None]):
    """Asks for a filter query and shows how many matrices match while typing."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, text: str, params: Sequence[ParamInfo]) -> None:
        super().__init__()
        self.text = text
        self.params = params

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("Filter matrices", classes="title")
            yield Input(value=self.text, placeholder="e.g. q k 3-5", id="filter-input")
            yield Static(id="filter-count")
            yield Static(FILTER_HELP, classes="hint")

    def on_mount(self) -> None:
        self._count(self.text)

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        self._count(event.value)

    def _count(self, text: str) -> None:
        label = self.query_one("#filter-count", Static)
        try:
            flt = MatrixFilter.parse(text)
        except ValueError as exc:
            label.update(Text(str(exc), style="red"))
            return
        matched = sum(1 for p in self.params if flt(p))
        label.update(f"{matched} of {len(self.params)} matrices match")

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        try:
            self.dismiss(MatrixFilter.parse(event.value))
        except ValueError as exc:
            self.query_one("#filter-count", Static).update(Text(str(exc), style="red"))

    def action_cancel(self) -> None:
        self.dismiss(None)


class PickRunScreen(ModalScreen[Path | None]):
    """Choose a run (for comparison)."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, runs: Sequence[Path], *, title: str) -> None:
        super().__init__()
        self.runs = list(runs)
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.title_text, classes="title")
            yield OptionList(*[Option(str(p), id=str(i)) for i, p in enumerate(self.runs)], id="run-options")
            yield Static("Enter chooses, Esc cancels", classes="hint")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.runs[int(event.option.id)])

    def action_cancel(self) -> None:
        self.dismiss(None)


def _key_name(key: str) -> str:
    names = {"slash": "/", "question_mark": "?", "equals_sign": "=", "plus": "+", "minus": "-", "space": "space",
             "escape": "esc", "enter": "enter", "pageup": "PgUp", "pagedown": "PgDn", "left": "←", "right": "→",
             "up": "↑", "down": "↓", "home": "Home", "end": "End", "shift+left": "shift+←", "shift+right": "shift+→"}
    return ", ".join(names.get(k.strip(), k.strip()) for k in key.split(","))


def help_text(sections: Sequence[tuple[str, Sequence[Binding]]]) -> Text:
    """Every key of every screen, taken from the screens' own bindings."""
    text = Text()
    for title, bindings in sections:
        text.append(f"{title}\n", style="bold underline")
        for binding in bindings:
            text.append(f"  {_key_name(binding.key):<16}", style="bold cyan")
            text.append(f"{binding.description}\n")
        text.append("\n")
    return text


class HelpScreen(ModalScreen[None]):
    """``?``: every key, by screen."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "close help")]

    def __init__(self, sections: Sequence[tuple[str, Sequence[Binding]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static("compass-monitor keys  (Esc or ? closes)", classes="title")
            with VerticalScroll():
                yield Static(help_text(self.sections), id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
