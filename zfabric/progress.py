"""Progress of a map on a terminal: tqdm where installed, a plain line otherwise (layer 1: imports nothing).

The rule it keeps: progress costs the map nothing per task but a counter; the
line is redrawn at most `REDRAW_S` apart.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

REDRAW_S = 0.1


class Progress:
    """``with Progress(total, "map inc") as bar: ... bar.update()`` (``total`` None when unknown)."""

    def __init__(self, total: int | None, description: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.description = description
        self.stream = stream or sys.stderr
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0
        self._tqdm: Any = None
        try:
            from tqdm import tqdm  # optional: pip install 'zfabric[progress]'
        except ImportError:
            pass
        else:
            self._tqdm = tqdm(total=total, desc=description, unit="task", file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.monotonic()
        if now - self._drawn >= REDRAW_S:
            self._drawn = now
            self._draw(now, end="")

    def _draw(self, now: float, end: str) -> None:
        rate = self.done / max(now - self._started, 1e-9)
        of = f"/{self.total:,}" if self.total is not None else ""
        share = f" {100 * self.done / self.total:3.0f}%" if self.total else ""
        self.stream.write(f"\r{self.description}:{share} {self.done:,}{of} tasks, {rate:,.0f}/s{end}")
        self.stream.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._draw(time.monotonic(), end="\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
