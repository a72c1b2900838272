"""One rich progress bar on stderr for long CLI steps; a no-op when disabled (tests, JSON output)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True,
                 transient: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1)``; nothing is drawn when ``enabled`` is false or there is nothing to do."""
    if not enabled or total == 0:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=transient) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
