"""`zfabric.Executor`: the fabric as a `concurrent.futures.Executor` (layer 5: imports syncclient, local;
only `__init__` imports it).

The rule it keeps: nothing the fabric needs refers back to the `Executor`
object. Its client, its unfinished futures and its local fabric live in a
`_Running` that a `weakref.finalize` holds, so an executor that is dropped
without `shutdown()` is still collected, and its fabric is still torn down.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
import weakref
from typing import Any, Generator, Iterable, Iterator

from .client import Client
from .config import ClientConfig
from .errors import ConfigError
from .handle import Handle
from .local import local
from .progress import Progress
from .submitter import TaskRef
from .syncclient import SyncClient

log = logging.getLogger(__name__)

__all__ = ["Executor"]


class Executor(concurrent.futures.Executor):
    """A `concurrent.futures.Executor` whose calls run on a zfabric fabric.

    ``Executor(workers=4, app=["myapp.tasks"])`` starts a local fabric (a
    scheduler and `workers` worker processes, as `zfabric.local` does) that
    `shutdown()` stops; ``Executor()`` starts one worker per CPU, as
    `ProcessPoolExecutor()` does. ``Executor(address="tcp://host:7100")``
    attaches to a running fabric, and `shutdown()` only closes the client.
    Other keyword arguments are `zfabric.local` options (local) or client
    options (attached). Functions must be defined in the workers' `app`
    modules; `fn` is the function or its ``"module:function"`` name.
    """

    def __init__(self, workers: int | None = None, app: Iterable[str] | str = (), *, address: str | None = None,
                 **options: Any) -> None:
        if address is not None:
            if workers is not None or app:
                raise ConfigError("give either address= (attach to a fabric) or workers=/app= (start one), not both")
            sync = SyncClient(address, **options)
        else:
            if workers is None:
                workers = os.cpu_count() or 1
            if type(workers) is not int or workers < 1:
                raise ConfigError(f"workers must be an int of at least 1, got {workers!r}")
            sync = _LocalSync(local(workers, app, **options))
        self._running = _Running(sync)
        self._lock = threading.Lock()
        self._shut = False
        self._finalizer = weakref.finalize(self, _collect, self._running)
        log.debug("executor on %s (%s)", self.address, "attached" if address is not None else f"{workers} workers")

    @property
    def address(self) -> str:
        """The fabric's address (another client or `zfabric status` can attach to a local one)."""
        return self._running.sync.client.config.address

    def submit(self, fn: TaskRef, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on the fabric; cancelling the future cancels the task."""
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = self._running.sync.submit(fn, *args, **kwargs)
            self._running.track(future)
        return future

    def map(self, fn: TaskRef, *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, progress: bool = False) -> Iterator[Any]:
        """Results in input order, as `concurrent.futures.Executor.map`: every call is submitted now, the
        deadline counts from this call, the first exception is raised where its result would be, and the
        calls not yet yielded are cancelled if the iterator is closed early. `chunksize` is accepted for
        compatibility: the fabric already batches calls on the wire. No Future is made per call (they cost
        more than the task): one `_Batch` waits for the handles in order. ``progress=True`` shows a bar on
        stderr as results are taken (tqdm where installed, a plain line otherwise)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = list(zip(*iterables))
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            batch = _Batch(self._running.sync, fn, calls)
            self._running.track(batch.done)
        results = batch.results(deadline)
        return _with_progress(results, len(calls), fn) if progress else results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; unfinished ones run to the end (or are cancelled, queued or running, with
        `cancel_futures`), then the client closes and a local fabric stops; in the background if not `wait`."""
        with self._lock:
            self._shut = True
        if cancel_futures:
            self._running.cancel_all()
        if self._finalizer.detach() is not None:
            if wait:
                self._running.close()
            else:
                threading.Thread(target=self._running.close, name="zfabric-executor-shutdown").start()
        elif wait:
            self._running.closed.wait()


def _with_progress(results: Generator[Any, None, None], total: int, fn: TaskRef) -> Iterator[Any]:
    bar = Progress(total, f"map {fn if isinstance(fn, str) else getattr(fn, '__qualname__', fn)}")
    try:
        for value in results:
            bar.update()
            yield value
    finally:
        bar.close()
        results.close()  # (cancels what was not taken, if the caller stopped early)


class _Batch:
    """The calls of one `Executor.map`: submitted in one turn of the loop thread, waited for in order."""

    def __init__(self, sync: SyncClient, fn: TaskRef, calls: list[tuple[Any, ...]]) -> None:
        self.sync = sync
        self.handles: list[Handle | BaseException] = []
        self.finished = 0  # counted on the loop thread only
        self.waiting: Handle | None = None  # the handle the caller's thread waits for (it alone is notified)
        self.cond = threading.Condition()
        self.submitted = threading.Event()
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()  # all finished (for shutdown)
        self.total = len(calls)
        self.done.add_done_callback(lambda f: self.cancel() if f.cancelled() else None)  # shutdown(cancel_futures)
        if not calls:
            self.submitted.set()
            self.done.set_result(None)
            return
        sync._loop.call_soon_threadsafe(self._submit, fn, calls)

    def _submit(self, fn: TaskRef, calls: list[tuple[Any, ...]]) -> None:  # on the loop thread
        client = self.sync.client
        for args in calls:
            try:
                handle = client.submit(fn, *args)
            except Exception as exc:  # a bad reference or an unsendable argument: that call's outcome
                self.handles.append(exc)
                self._one_done(None)
                continue
            self.handles.append(handle)
            handle.add_done_callback(self._one_done)
        self.submitted.set()

    def _one_done(self, handle: object) -> None:
        # A handle is DONE before its callbacks run, and the waiter re-checks after naming its handle under
        # the lock: a wake-up is needed only for the handle it names, not for each of thousands.
        self.finished += 1
        if handle is self.waiting:
            with self.cond:
                self.cond.notify_all()
        if self.finished == self.total and not self.done.done():
            self.done.set_result(None)

    def results(self, deadline: float | None) -> Generator[Any, None, None]:
        try:
            self.submitted.wait()
            for item in self.handles:
                if isinstance(item, BaseException):
                    raise item
                if not item.done():
                    with self.cond:
                        self.waiting = item
                        while not item.done():
                            left = None if deadline is None else deadline - time.monotonic()
                            if left is not None and left <= 0:
                                raise TimeoutError()
                            self.cond.wait(left)
                yield item.result()
        finally:
            self.cancel()  # closed early, a timeout or an error: the calls not yielded yet are dropped

    def cancel(self) -> None:
        undone = [h for h in self.handles if isinstance(h, Handle) and not h.done()]
        if undone:
            try:
                self.sync._loop.call_soon_threadsafe(lambda: [h.cancel() for h in undone])
            except RuntimeError:  # the loop is closed: so is the client, and its tasks with it
                pass


class _LocalSync(SyncClient):
    """A `SyncClient` whose loop thread also runs a local fabric (started before the client, stopped after)."""

    def __init__(self, fabric: local) -> None:
        self._fabric = fabric
        super().__init__()

    async def _open(self, address: str | ClientConfig | None, options: dict[str, Any]) -> Client:
        return await self._fabric.__aenter__()

    async def _close(self) -> None:
        await self._fabric.__aexit__(None, None, None)


class _Running:
    """What outlives the `Executor` object: its client and its unfinished futures."""

    def __init__(self, sync: SyncClient) -> None:
        self.sync = sync
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._futures: set[concurrent.futures.Future[Any]] = set()

    def track(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def _unfinished(self) -> list[concurrent.futures.Future[Any]]:
        with self._lock:
            return list(self._futures)

    def cancel_all(self) -> None:
        for future in self._unfinished():
            future.cancel()

    def close(self) -> None:
        """Wait for the unfinished futures, then close the client (and stop a local fabric)."""
        try:
            concurrent.futures.wait(self._unfinished())
            self.sync.close()
        except Exception:  # a caller cannot act on it (and a background thread has no caller)
            log.exception("executor: shutting down failed")
        finally:
            self.closed.set()


def _collect(running: _Running) -> None:
    """An executor was collected without `shutdown()`: close in the background, as `ProcessPoolExecutor`
    does (at interpreter exit, here: a thread started now would not be waited for)."""
    if threading.main_thread().is_alive():
        threading.Thread(target=running.close, name="zfabric-executor-shutdown").start()
    else:
        running.close()
