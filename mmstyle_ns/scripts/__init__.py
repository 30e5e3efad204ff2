"""Console entry points of the package (``mmstyle-*``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def reported_input_errors(heading: str) -> Iterator[None]:
    """Turns a :class:`~mmstyle_ns.style.sources.StyleInputError` or
    :class:`~mmstyle_ns.clip.loader.ClipLoadError` into a plain message and exit status 2."""
    from nerfstudio.utils.rich_utils import CONSOLE

    from mmstyle_ns.clip.loader import ClipLoadError
    from mmstyle_ns.style.sources import StyleInputError

    try:
        yield
    except (StyleInputError, ClipLoadError) as error:
        CONSOLE.print(f"[bold red]{heading}:[/bold red]\n{error}")
        raise SystemExit(2) from None
