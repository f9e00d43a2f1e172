"""`zfabric top`: a live terminal view of a fabric (layer 5: the optional ``observe`` extra's rich).

The rule it keeps: it only reads the scheduler's status, twice a second, like any client; rates and the
throughput sparkline come from the differences between two statuses. `view` is a pure function of what
was seen, so it can be tested without a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import deque
from typing import Any, Iterator

from .errors import ConfigError
from .routing import make_route

REFRESH_S = 0.5
HISTORY = 120
"""Throughput samples the sparkline shows (one a refresh: a minute)."""
SPARKS = "▁▂▃▄▅▆▇█"


def require_rich() -> Any:
    try:
        import rich
    except ImportError:
        raise ConfigError("zfabric top needs rich, in the 'observe' extra: pip install 'zfabric[observe]'") from None
    return rich


def sparkline(values: list[float], width: int) -> str:
    values = values[-width:]
    top = max(values, default=0) or 1
    return "".join(SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))] for v in values)


class Seen:
    """What `top` has seen: the latest status, the one before, and the done rate over time."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None
        self.previous: dict[str, Any] | None = None
        self.at = self.previous_at = 0.0
        self.rates: deque[float] = deque(maxlen=HISTORY)

    def add(self, status: dict[str, Any], now: float) -> None:
        self.previous, self.previous_at = self.status, self.at
        self.status, self.at = status, now
        if self.previous is not None:
            self.rates.append(max(0.0, (status["done"] + status["failed"] - self.previous["done"]
                                        - self.previous["failed"]) / max(now - self.previous_at, 1e-6)))

    def worker_rate(self, worker: dict[str, Any]) -> float:
        if self.previous is None:
            return 0.0
        before = next((w for w in self.previous["workers"] if w["name"] == worker["name"]
                       and w["pid"] == worker["pid"]), None)
        return 0.0 if before is None else max(0.0, (worker["done"] - before["done"]) / max(self.at - self.previous_at, 1e-6))


def view(seen: Seen, width: int = 120) -> Any:
    """The screen for what was seen (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    status = seen.status
    if status is None:
        return Text("waiting for the scheduler's status...")
    rate = seen.rates[-1] if seen.rates else 0.0
    head = Text.assemble(
        ("zfabric ", "bold"), str(status.get("address", "")), f"   up {status.get('uptime_s', 0):.0f} s   ",
        ("workers ", "bold"), str(len(status["workers"])), "   ", ("queued ", "bold"), f"{status['queued']:,}",
        "   ", ("running ", "bold"), f"{status['running']:,}", "   ", ("done ", "bold"), f"{status['done']:,}",
        "   ", ("failed ", "bold red" if status["failed"] else "bold"), f"{status['failed']:,}",
        "   ", ("lost ", "bold"), f"{status['lost']:,}", "   ", ("redelivered ", "bold"), f"{status['redelivered']:,}")
    spark = Text.assemble(("tasks/s ", "bold"), f"{rate:>10,.0f}  ", (sparkline(list(seen.rates), width - 22), "green"))
    workers = Table(title=None, expand=True, header_style="bold")
    for column, justify in (("worker", "left"), ("host", "left"), ("pid", "right"), ("running", "right"),
                            ("free", "right"), ("done", "right"), ("tasks/s", "right"), ("", "left")):
        workers.add_column(column, justify=justify)  # type: ignore[arg-type]
    for w in sorted(status["workers"], key=lambda w: w["name"]):
        note = "draining" if w.get("draining") else ", ".join(w.get("tags", []))
        # Text, never a str: rich would read a peer's "[/]" in a name as markup (and raise)
        workers.add_row(Text(str(w["name"])), Text(str(w["host"])), str(w["pid"]), f"{w['running']:,}",
                        f"{w['free']:,}", f"{w['done']:,}", f"{seen.worker_rate(w):,.0f}", Text(note))
    parts: list[Any] = [head, spark, workers]
    for route in status.get("waiting", []):
        wanted = make_route(route["tags"], route["resources"])
        who = (f"{route['workers']} live workers can take them, {route['busy']} busy" if route["workers"]
               else "no live worker can take them")
        parts.append(Text(f"waiting: {route['queued']:,} tasks for {wanted.describe() if wanted else 'nothing'} "
                          f"({who})", style="yellow"))
    failures = Table(title="recent failures", expand=True, header_style="bold", title_justify="left")
    for column in ("when", "task", "worker", "error"):
        failures.add_column(column)
    for failure in list(status.get("recent_failures", []))[-8:][::-1]:
        when = time.strftime("%H:%M:%S", time.localtime(failure["t"]))
        failures.add_row(when, f"{failure['task']:#x}", Text(str(failure["worker"] or "-")),
                         Text(f"{failure['type']}: {failure['message']}", style="red"))
    parts += [failures, Text("q quits", style="dim")]
    return Group(*parts)


@contextlib.contextmanager
def _keys() -> Iterator[asyncio.Queue[str]]:
    """Keys pressed, one character at a time (stdin in cbreak mode, restored afterwards)."""
    keys: asyncio.Queue[str] = asyncio.Queue()
    if not sys.stdin.isatty():
        yield keys
        return
    import termios
    import tty
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()
    tty.setcbreak(fd)
    loop.add_reader(fd, lambda: keys.put_nowait(os.read(fd, 1).decode(errors="replace")))
    try:
        yield keys
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run(client: Any) -> None:
    """Show the fabric of `client` until `q` (or Ctrl-C)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    seen = Seen()
    with _keys() as keys, Live(view(seen), console=console, screen=True, auto_refresh=False) as live:
        while True:
            try:
                seen.add(await client.status(5.0), time.monotonic())
            except asyncio.TimeoutError:
                pass
            live.update(view(seen, console.width), refresh=True)
            try:
                key = await asyncio.wait_for(keys.get(), REFRESH_S)
            except asyncio.TimeoutError:
                continue
            if key in ("q", "Q"):
                return
