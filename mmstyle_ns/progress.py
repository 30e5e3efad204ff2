"""Progress reporting for long commands: a rich bar on a terminal, plain lines in logs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def print_line(message: str) -> None:
    """Prints a line and flushes it (so logs show it at once)."""
    print(message, flush=True)


@contextmanager
def progress(total: int, description: str, quiet: bool) -> Iterator[Callable[..., None]]:
    """A rich progress bar on a terminal, a plain line every 5% otherwise (logs); yields ``advance(**fields)``."""
    if quiet:
        yield lambda **_: None
        return

    def info_of(fields: dict[str, Any]) -> str:
        return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())

    if not sys.stdout.isatty():
        start, done = time.perf_counter(), 0
        every = max(1, total // 20)

        def advance_plain(**fields: Any) -> None:
            nonlocal done
            done += 1
            if done % every == 0 or done == total:
                elapsed = time.perf_counter() - start
                left = elapsed / done * (total - done)
                print_line(f"{description}: {done}/{total}  {elapsed:.0f} s, ~{left:.0f} s left  {info_of(fields)}")

        yield advance_plain
        return

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(**fields: Any) -> None:
            progress.update(task, advance=1, info=info_of(fields))

        yield advance
