"""What a task's outcome becomes on the wire (layer 3: imports protocol, errors).

The rule it keeps: pure functions, no sockets and no event loop. They turn a
return value or an exception into a RESULT entry, and decide, from the
task's options, whether a failure is retried and after what back-off.
"""

from __future__ import annotations

import random
import traceback
from typing import Any, Callable

from .protocol import MAX_FRAME_BYTES, Status, encode_error, encode_value
from .errors import remote_type_name

MAX_TRACEBACK_CHARS = 8000

OPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "timeout_s": (int, float),
    "retries": int,
    "retry_on": list,
    "backoff_s": (int, float),
    "serializer": str,
}


MAX_RESULT_BYTES = MAX_FRAME_BYTES - 64 * 1024
"""Largest encoded result: one RESULT frame must stay under the frame limit, or the link to the sink drops."""
MAX_MESSAGE_CHARS = 64 * 1024
"""Longest exception message a failure carries (its traceback is cut to `MAX_TRACEBACK_CHARS`): an error
result must always fit a frame, whatever the task raised."""


def oversize_error(size: int) -> bytes:
    """The error payload for a result of `size` encoded bytes, too large for a RESULT frame."""
    return encode_error(
        "ValueError", f"the task's result is {size:,} bytes encoded, over the limit of {MAX_RESULT_BYTES:,} "
                      f"bytes (the {MAX_FRAME_BYTES:,}-byte frame limit less room for the envelope); return "
                      "large data by reference (a path or URL) instead")


def result_entry(value: Any, pickled: bool = False) -> tuple[int, bytes | memoryview]:
    """(status, payload) for a returned value (pickled for a pickled call); an unsendable or oversize value
    becomes an error."""
    try:
        data = encode_value(value, pickled)
    except Exception as exc:
        return Status.ERROR, encode_error(
            "TypeError", _cut(f"the task returned a {type(value).__name__}, which cannot be sent back: {exc}"))
    if len(data) > MAX_RESULT_BYTES:
        return Status.ERROR, oversize_error(len(data))
    return Status.OK, data


def _cut(message: str) -> str:
    """`message` bounded in length and safe to encode (a lone surrogate would make msgpack refuse it)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def error_entry(exc: BaseException, status: int = Status.ERROR) -> tuple[int, bytes]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    try:
        message = str(exc)
    except Exception as str_exc:  # a user exception whose __str__ fails still fails its task, not the worker
        message = f"<{type(exc).__name__}.__str__ raised {type(str_exc).__name__}>"
    return status, encode_error(_cut(remote_type_name(type(exc))[:200]), _cut(message), _cut(text))


def retry_delay(exc: BaseException, options: dict[str, Any], tries: int) -> float | None:
    """Seconds to wait before the next try, or None when the failure is final.

    Options: ``retries`` (how many more tries), ``retry_on`` (exception class
    names, matched along the class's MRO; default: any Exception),
    ``backoff_s`` (first delay; doubles each try, with ±50 % jitter).
    """
    retries = options.get("retries", 0)
    if type(retries) is not int or tries >= retries or not isinstance(exc, Exception):
        return None
    retry_on = options.get("retry_on")
    if retry_on:
        names = {cls.__name__ for cls in type(exc).__mro__} | {
            f"{cls.__module__}.{cls.__name__}" for cls in type(exc).__mro__}
        if not names.intersection(x for x in retry_on if type(x) is str):
            return None
    base = options.get("backoff_s", 0.1)
    base = float(base) if isinstance(base, (int, float)) else 0.1
    return min(300.0, base * (2 ** min(tries, 20)) * random.uniform(0.5, 1.5))


OPTION_RANGES: dict[str, tuple[float, float]] = {
    "timeout_s": (1e-3, 7 * 24 * 3600.0), "retries": (0, 1000), "backoff_s": (0.0, 3600.0)}


def check_options(options: dict[str, Any]) -> str | None:
    """None if the submission options are valid, else what is wrong."""
    for key, value in options.items():
        expected = OPTION_TYPES.get(key)
        if expected is None:
            return f"unknown option {key!r} (known: {', '.join(OPTION_TYPES)})"
        if not isinstance(value, expected) or isinstance(value, bool):
            return f"option {key!r} must be {expected}, got {type(value).__name__}"
        checked: Any = value  # (isinstance above narrowed `value` to object for the type checker)
        bounds = OPTION_RANGES.get(key)
        if bounds is not None and not bounds[0] <= checked <= bounds[1]:  # also refuses NaN
            return f"option {key!r} must be between {bounds[0]:g} and {bounds[1]:g}, got {checked!r}"
        if key == "retry_on" and not all(type(name) is str and len(name) < 200 for name in checked):
            return "option 'retry_on' must be a list of exception class names"
        if key == "serializer" and checked != "pickle":
            return "option 'serializer' can only be 'pickle' (the default, msgpack, needs no option)"
    return None


def call_sync(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], options: dict[str, Any],
              tries: int) -> tuple[int, bytes | memoryview, float | None]:
    """Run a sync function: (status, payload, None), or (ERROR, b"", delay) when it should be retried."""
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        delay = retry_delay(exc, options, tries)
        if delay is not None:
            return Status.ERROR, b"", delay
        return (*error_entry(exc), None)
    return (*result_entry(value, options.get("serializer") == "pickle"), None)


class InlinePolicy:
    """Which sync functions may run on the event loop itself instead of a thread.

    A thread hop costs more than a tiny function (hundreds of µs on a busy
    host), so a function that proved fast — every one of its first `samples`
    runs under `fast_s` — runs inline, at most `budget_s` of inline work per
    batch of input so heartbeats still flow. One inline run over `slow_s` sends
    that function back to the threads for good.
    """

    def __init__(self, samples: int = 20, fast_s: float = 0.0005, slow_s: float = 0.005,
                 budget_s: float = 0.02) -> None:
        self.samples, self.fast_s, self.slow_s, self.budget_s = samples, fast_s, slow_s, budget_s
        self._seen: dict[Any, int] = {}
        self._fast: set[Any] = set()
        self._never: set[Any] = set()
        self._spent = 0.0

    def new_batch(self) -> None:
        self._spent = 0.0

    def may_inline(self, fn: Any) -> bool:
        return fn in self._fast and self._spent < self.budget_s

    def observed(self, fn: Any, seconds: float, inline: bool) -> None:
        if inline:
            self._spent += seconds
            if seconds > self.slow_s:
                self._fast.discard(fn)
                self._never.add(fn)
            return
        if fn in self._never or fn in self._fast:
            return
        if seconds > self.fast_s:
            self._never.add(fn)
            self._seen.pop(fn, None)
            return
        count = self._seen.get(fn, 0) + 1
        self._seen[fn] = count
        if count >= self.samples:
            self._fast.add(fn)
            del self._seen[fn]
