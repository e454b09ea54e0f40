"""Progress bars that suit both a terminal and a log file.

On a terminal a bar redraws in place. Written to a file or a pipe (CI, ``nohup``, ``| tee``), tqdm's
``\\r`` redraws pile up into one unreadable line of thousands of updates; there the bar instead prints
one plain line at most every ``LOG_INTERVAL`` seconds (and its final state), so a log stays readable.
Every bar in unialign comes from :func:`progress`.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

from tqdm.auto import tqdm

LOG_INTERVAL = 15.0  # seconds between progress lines when stderr is not a terminal


class _LineWriter:
    """A file-like wrapper that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> int:
        for part in s.replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", disable: bool = False, leave: bool = True) -> tqdm:
    """A tqdm bar: redrawn in place on a terminal, a line every ``LOG_INTERVAL`` s elsewhere."""
    if is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, smoothing=0.1)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=True, file=_LineWriter(sys.stderr),
                mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL * 4, ascii=True, dynamic_ncols=False, ncols=100)


def quiet_hub_bars() -> None:
    """Off a terminal, also silence the bars transformers and huggingface_hub draw themselves (weight
    loading, downloads): they do not go through :func:`progress` and would flood the log the same way."""
    if is_terminal():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency of sentence-transformers
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


__all__ = ["LOG_INTERVAL", "is_terminal", "progress", "quiet_hub_bars"]
