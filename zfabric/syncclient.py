"""A blocking facade over `Client` for code without an event loop (layer 5).

The rule it keeps: every socket stays on one private event-loop thread;
callers' threads only hand work to it and wait on `concurrent.futures`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Iterable

from .client import Client
from .submitter import TaskRef
from .config import ClientConfig
from .handle import Handle


class SyncClient:
    """``with zfabric.SyncClient("tcp://host:7100") as c: c.submit(fn, 1).result(10); c.map(fn, xs)``."""

    def __init__(self, address: str | ClientConfig | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zfabric-client", daemon=True)
        self._thread.start()
        try:
            self._client: Client = self._call(self._open(address, options), None)
        except BaseException:
            self._shutdown_loop()
            raise

    async def _open(self, address: str | ClientConfig | None, options: dict[str, Any]) -> Client:
        """Start the client, on the loop thread (`Executor` overrides this and `_close` for a local fabric)."""
        return await Client(address, **options).start()

    async def _close(self) -> None:
        await self._client.stop()

    @property
    def client(self) -> Client:
        return self._client

    def _call(self, coro: Any, timeout: float | None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, fn: TaskRef, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Submit one task; the returned future's `.result(timeout)` gives its value."""
        return self._submit(fn, args, kwargs, {})

    def options(self, *, priority: int = 0, **options: Any) -> "_SyncSubmitter":
        return _SyncSubmitter(self, priority, options)

    def _submit(self, fn: TaskRef, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any],
                priority: int = 0) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def submit_on_loop() -> None:
            if future.cancelled():
                return
            try:
                submitter = self._client.options(priority=priority, **options) if options or priority else self._client
                handle = submitter.submit(fn, *args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
                return
            handle.add_done_callback(lambda h: _copy_outcome(h, future))
            future.add_done_callback(lambda f: self._cancel_soon(handle) if f.cancelled() else None)

        self._loop.call_soon_threadsafe(submit_on_loop)
        return future

    def _cancel_soon(self, handle: Handle) -> None:
        """A caller cancelled a future: cancel its task too (on the loop thread, if it still runs)."""
        try:
            self._loop.call_soon_threadsafe(handle.cancel)
        except RuntimeError:  # the loop is closed: the client is gone, and with it the task
            pass

    def map(self, fn: TaskRef, *iterables: Iterable[Any], timeout: float | None = None, progress: bool = False,
            **options: Any) -> list[Any]:
        """Results in input order (options as in `Client.options`; ``progress=True`` shows a bar)."""
        submitter = self._client.options(**options) if options else self._client
        return self._call(submitter.map(fn, *iterables, progress=progress), timeout)

    def status(self) -> dict[str, Any]:
        return self._call(self._client.status(), None)

    def close(self) -> None:
        try:
            if self._loop.is_running():
                self._call(self._close(), 30)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SyncSubmitter:
    def __init__(self, sync: SyncClient, priority: int, options: dict[str, Any]) -> None:
        sync.client.options(priority=priority, **options)  # validates now, in the caller's thread
        self._sync, self._priority, self._options = sync, priority, options

    def submit(self, fn: TaskRef, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self._sync._submit(fn, args, kwargs, self._options, self._priority)

    def map(self, fn: TaskRef, *iterables: Iterable[Any], timeout: float | None = None) -> list[Any]:
        return self._sync.map(fn, *iterables, timeout=timeout, priority=self._priority, **self._options)


def _copy_outcome(handle: Handle, future: concurrent.futures.Future[Any]) -> None:
    if future.set_running_or_notify_cancel():
        error = handle.exception()
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(handle.result())
