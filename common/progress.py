"""One progress-bar style for all long work (rich, on stderr so --json stdout stays clean)."""
from __future__ import annotations


def progress_bar(enabled: bool = True, transient: bool = True):
    """A ``rich.progress.Progress`` (use as a context manager), or None when disabled."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    console=Console(stderr=True), transient=transient)
