"""Threads that run a worker's sync functions (layer 4: imports execution).

The rule it keeps: threads never touch sockets or the worker's state. They
take calls from a queue, run them, append outcomes to a deque and wake the
event loop at most once per batch (`call_soon_threadsafe` only when no wake
is pending), so a burst of tiny tasks costs one wake-up, not one per task.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from typing import Any, Callable

from .execution import call_sync

Outcome = tuple[int, int, str, int, "bytes | memoryview", "float | None", Any, float]
"""(task id, run, sink, status, payload, retry delay or None, function, seconds it ran)."""


class SyncThreads:
    """`n` threads running sync calls; outcomes reach `on_outcome` on the event loop, in batches."""

    def __init__(self, n: int, on_outcome: Callable[[Outcome], None]) -> None:
        self._on_outcome = on_outcome
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._unstarted: dict[int, list[Any]] = {}
        self._done: deque[Outcome] = deque()
        self._wake_pending = False
        self._loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=self._main, name=f"zfabric-sync-{i}", daemon=True)
                         for i in range(n)]
        for thread in self._threads:
            thread.start()

    def submit(self, task_id: int, run: int, sink: str, tries: int, fn: Callable[..., Any], args: list[Any],
               kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        item = [task_id, run, sink, tries, fn, args, kwargs, options]
        self._unstarted[task_id] = item
        self._queue.put(item)

    def withdraw(self, task_id: int) -> bool:
        """Take back a call that has not started; False if it is running or done."""
        return self._unstarted.pop(task_id, None) is not None

    def withdraw_all(self) -> list[int]:
        """Take back every call that has not started (dict.pop is atomic: a thread starts it or we take it)."""
        return [task_id for task_id in list(self._unstarted) if self.withdraw(task_id)]

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _main(self) -> None:
        get, unstarted, done = self._queue.get, self._unstarted, self._done
        while True:
            item = get()
            if item is None:
                return
            task_id, run, sink, tries, fn, args, kwargs, options = item
            if unstarted.pop(task_id, None) is None:
                continue  # withdrawn before it started
            started = time.perf_counter()
            status, data, delay = call_sync(fn, args, kwargs, options, tries)
            done.append((task_id, run, sink, status, data, delay, fn, time.perf_counter() - started))
            if not self._wake_pending:
                self._wake_pending = True
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop closed during shutdown
                    return

    def _deliver(self) -> None:
        self._wake_pending = False  # before draining: a later append schedules a new wake-up
        done, on_outcome = self._done, self._on_outcome
        while done:
            on_outcome(done.popleft())
