"""Rich progress bars for long training steps and a Keras callback that drives one per epoch."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import keras
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich bar on stderr; yields ``advance(n)``. Disabled, it yields a no-op."""
    if not enabled:
        yield lambda _n: None
        return
    with _progress(Console(file=sys.stderr)) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda n: bar.advance(task, n)


class RichProgress(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped
    """One rich bar per epoch on stderr, showing the running loss and active-triplet fraction."""

    def __init__(self, epochs: int, steps: int) -> None:
        super().__init__()
        self.epochs, self.steps = epochs, steps
        self._bar: Progress | None = None
        self._task: Any = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Start this epoch's bar."""
        self._bar = _progress(Console(file=sys.stderr))
        self._bar.start()
        self._task = self._bar.add_task(f"epoch {epoch + 1}/{self.epochs}", total=self.steps, info="")

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Advance and show the running figures."""
        if self._bar is not None:
            info = "  ".join(f"{k}={float(v):.4f}" for k, v in (logs or {}).items())
            self._bar.update(self._task, advance=1, info=info)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Close this epoch's bar."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
