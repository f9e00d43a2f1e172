"""The lifecycle every component shares (layer 3: imports nothing from zfabric).

The rule it keeps: a component's background tasks live in `_tasks` and end
when `_stop` is set; `async with` starts and stops it, `wait_closed` waits
for it to stop (a worker that drained, a signal).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

S = TypeVar("S", bound="Service")


class Service:
    """Base of Scheduler, Worker, Client and Sink."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self: S) -> S:
        raise NotImplementedError

    async def stop(self) -> None:
        await self._end_tasks()

    async def _end_tasks(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def wait_closed(self) -> None:
        await self._stop.wait()

    async def __aenter__(self: S) -> S:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
