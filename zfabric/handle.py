"""Task handles and `as_completed` (layer 4: imports protocol, errors).

The rule it keeps: a handle is small (one object with slots, no Future until
someone awaits it) because a client may hold hundreds of thousands of them.
While a task is unfinished its handle also keeps the encoded call: the
client is the durable copy of every task it submitted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable, Generator, Iterable, Protocol

from .errors import FabricError, TaskCancelled, TaskError, TaskRejected, TaskTimeout, WorkerLost, remote_error
from .protocol import Status, decode_error, decode_value

log = logging.getLogger(__name__)


class HandleOwner(Protocol):
    """What a handle needs from its client (so this module need not import the client)."""

    _loop: asyncio.AbstractEventLoop

    def _cancel(self, handle: "Handle") -> None: ...


WAITING, SENT, DONE = 0, 1, 2

_ERRORS: dict[int, type[TaskError]] = {Status.TIMEOUT: TaskTimeout, Status.LOST: WorkerLost, Status.REJECTED: TaskRejected}
"""Failures the fabric names; a task's own exception (Status.ERROR) becomes `remote_error`'s typed TaskError."""


class Handle:
    """The caller's view of one submitted task: awaitable, with `.id`, `.done()`, `.cancel()`, `.result()`."""

    __slots__ = ("id", "payload", "placement", "state", "_client", "_value", "_error", "_future", "_callbacks")

    def __init__(self, task_id: int, client: HandleOwner, payload: bytes | memoryview, placement: Any) -> None:
        self.id = task_id
        self.payload: bytes | memoryview | None = payload
        self.placement = placement  # its SUBMIT entry's second item: priority, or [priority, tags, resources]
        self.state = WAITING
        self._client = client
        self._value: Any = None
        self._error: BaseException | None = None
        self._future: asyncio.Future[None] | None = None
        self._callbacks: list[Callable[[Handle], Any]] | None = None

    def __repr__(self) -> str:
        what = ("waiting", "sent", "done")[self.state]
        return f"<Handle {self.id:#x} {what}>"

    def done(self) -> bool:
        return self.state == DONE

    def cancel(self) -> bool:
        """Cancel the task: removed if queued, cancelled on its worker if running. False if already done."""
        if self.state == DONE:
            return False
        self._client._cancel(self)
        self._finish(None, TaskCancelled(f"task {self.id:#x} was cancelled"))
        return True

    def cancelled(self) -> bool:
        return isinstance(self._error, TaskCancelled)

    def result(self) -> Any:
        """The value, or raise the task's error; `asyncio.InvalidStateError` if not done yet."""
        if self.state != DONE:
            raise asyncio.InvalidStateError(f"task {self.id:#x} is not done")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        if self.state != DONE:
            raise asyncio.InvalidStateError(f"task {self.id:#x} is not done")
        return self._error

    def add_done_callback(self, fn: Callable[["Handle"], Any]) -> None:
        if self.state == DONE:
            _call(fn, self)
        elif self._callbacks is None:
            self._callbacks = [fn]
        else:
            self._callbacks.append(fn)

    def __await__(self) -> Generator[Any, None, Any]:
        if self.state != DONE:
            if self._future is None:
                self._future = self._client._loop.create_future()
            yield from self._future.__await__()
        return self.result()

    # ---- called by the client -------------------------------------------------------------

    def _finish(self, value: Any, error: BaseException | None) -> None:
        self._value = value
        self._error = error
        self.payload = None
        self.state = DONE  # last: a thread that sees DONE (Executor.map) must see the outcome too
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        if self._callbacks is not None:
            callbacks, self._callbacks = self._callbacks, None
            for fn in callbacks:
                _call(fn, self)  # one raising callback must not stop the others, or the client's result batch

    def _resolve(self, status: int, data: bytes, accept_pickle: bool = False) -> None:
        try:
            if status == Status.OK:
                self._finish(decode_value(data, accept_pickle=accept_pickle), None)
                return
            if status == Status.CANCELLED:
                self._finish(None, TaskCancelled(f"task {self.id:#x} was cancelled on its worker"))
                return
            type_name, message, tb = decode_error(data)
            make = _ERRORS.get(status, remote_error)
            self._finish(None, make(type_name, message, tb, self.id))
        except FabricError as exc:
            self._finish(None, TaskError("ProtocolError", f"the result could not be decoded: {exc}", "", self.id))


def _call(fn: Callable[[Handle], Any], handle: Handle) -> None:
    """Run a done-callback; an exception in it is logged (as asyncio does for Future callbacks)."""
    try:
        fn(handle)
    except Exception:
        log.exception("exception in done-callback %r of %r", fn, handle)


async def as_completed(handles: Iterable[Handle]) -> AsyncIterator[Handle]:
    """Yield handles as their tasks finish (await or `.result()` each to get its value)."""
    queue: asyncio.Queue[Handle] = asyncio.Queue()
    count = 0
    for handle in handles:
        handle.add_done_callback(queue.put_nowait)
        count += 1
    for _ in range(count):
        yield await queue.get()
