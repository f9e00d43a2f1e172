"""Submission with options, and `map`/`imap` over an iterable (layer 4: imports execution, handle).

The rule it keeps: submission options live on a `Submitter`, never among
the task's own keyword arguments, so `fn(timeout_s=...)` always reaches `fn`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Protocol

from .errors import ConfigError
from .execution import check_options
from .handle import Handle
from .progress import Progress
from .routing import checked_route, placement

if TYPE_CHECKING:
    from .config import ClientConfig

TaskRef = Callable[..., Any] | str
"""A function object, or its ``"module:function"`` name."""


class SubmitTarget(Protocol):
    """What a `Submitter` needs from its client (so this module need not import the client)."""

    config: "ClientConfig"

    def _submit(self, fn: TaskRef, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any],
                placement: Any) -> Handle: ...

    async def _wait_for_room(self) -> None: ...

    def _name(self, fn: TaskRef) -> str: ...


class Submitter:
    """Submission with options, e.g. ``client.options(timeout_s=5, retries=2, priority=1).submit(fn, x)``.

    Options never mix with the task's own keyword arguments.
    ``priority`` (int, higher first), ``timeout_s``, ``retries``, ``retry_on``
    (exception class names), ``backoff_s``; ``tags`` (a list: run only on workers with every one) and
    ``resources`` (``{"gpu": 1}``: held on the worker while the task runs).
    """

    def __init__(self, client: SubmitTarget, priority: int = 0, *, tags: Iterable[str] = (),
                 resources: dict[str, float] | None = None, **options: Any) -> None:
        if type(priority) is not int:
            raise ConfigError(f"priority must be an int, got {type(priority).__name__}")
        route = checked_route(tags, resources)
        if "serializer" in options:
            raise ConfigError("serializer is a setting of the client, for all its tasks: "
                              "zfabric.Client(address, serializer='pickle')")
        if "retry_on" in options:
            options["retry_on"] = [c if isinstance(c, str) else c.__name__ for c in options["retry_on"]]
        problem = check_options(options)
        if problem:
            raise ConfigError(problem)
        self._client = client
        self._placement = placement(priority, route)
        self._options = options

    def submit(self, fn: TaskRef, /, *args: Any, **kwargs: Any) -> Handle:
        return self._client._submit(fn, args, kwargs, self._options, self._placement)

    async def submit_wait(self, fn: TaskRef, /, *args: Any, **kwargs: Any) -> Handle:
        await self._client._wait_for_room()
        return self.submit(fn, *args, **kwargs)

    async def map(self, fn: TaskRef, *iterables: Iterable[Any], window: int | None = None,
                  progress: bool = False) -> list[Any]:
        return [value async for value in self.imap(fn, *iterables, window=window, progress=progress)]

    async def imap(self, fn: TaskRef, *iterables: Iterable[Any], window: int | None = None,
                   progress: bool = False) -> AsyncIterator[Any]:
        """Results in input order, keeping at most `window` tasks outstanding (the iterable may be lazy);
        ``progress=True`` shows a bar on stderr (tqdm where installed, a plain line otherwise)."""
        window = window or self._client.config.window
        name = self._client._name(fn)
        if progress:
            bar = Progress(_length(iterables), f"map {name}")
            try:
                async for value in self.imap(fn, *iterables, window=window):
                    bar.update()
                    yield value
            finally:
                bar.close()
            return
        pending: deque[Handle] = deque()
        items = iter(zip(*iterables)) if len(iterables) != 1 else ((x,) for x in iterables[0])
        submit = self._client._submit
        try:
            for args in items:
                pending.append(submit(name, args, {}, self._options, self._placement))
                if len(pending) >= window:
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for handle in pending:
                handle.cancel()


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls a map of these makes, if they all know their length (zip stops at the shortest)."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a lazy iterable, or none at all
        return None
