"""Functions for the demo, the benchmark and the tests (an `--app` module like any user's)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import os
import time
from typing import Any


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def echo(value: Any) -> Any:
    return value


def size(data: bytes) -> int:
    return len(data)


def fail(message: str = "x") -> None:
    raise ValueError(message)


def slow(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


async def asleep(seconds: float, value: Any = None) -> Any:
    await asyncio.sleep(seconds)
    return value


async def aecho(value: Any) -> Any:
    return value


def pid() -> int:
    return os.getpid()


async def apid(seconds: float = 0.0) -> int:
    await asyncio.sleep(seconds)
    return os.getpid()


def where(seconds: float = 0.0) -> list[Any]:
    """(hostname, pid) of the worker that ran it."""
    time.sleep(seconds)
    return [os.uname().nodename, os.getpid()]


def digest(seed: int, rounds: int = 2000) -> str:
    """A small CPU-bound job: an iterated SHA-256 chain."""
    h = seed.to_bytes(8, "little")
    for _ in range(rounds):
        h = hashlib.sha256(h).digest()
    return h.hex()


def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi) by trial division: CPU work that releases no GIL."""
    count = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0:
            count += n == 2
            continue
        f = 3
        while f * f <= n:
            if n % f == 0:
                break
            f += 2
        else:
            count += 1
    return count


def crash(code: int = 1) -> None:
    """Kills the worker process that runs it (a poison task)."""
    os._exit(code)


def slow_then_touch(seconds: float, path: str) -> None:
    """Sleep, then create `path` (to show a timed-out task really stopped)."""
    time.sleep(seconds)
    with open(path, "w"):
        pass


# ---- for the fault-tolerance tests (tests/test_faults.py) ----------------------------------------


async def asleep_pid(seconds: float, value: Any = None) -> list[Any]:
    """Sleep on the loop, then return [value, pid of the worker that ran it]."""
    await asyncio.sleep(seconds)
    return [value, os.getpid()]


async def aspan(seconds: float) -> list[Any]:
    """Sleep on the loop; return [pid, start, end] (wall clock), to see which tasks overlapped where."""
    start = time.time()
    await asyncio.sleep(seconds)
    return [os.getpid(), start, time.time()]


def slow_pid(seconds: float, value: Any = None) -> list[Any]:
    """Sleep in a worker thread, then return [value, pid of the worker that ran it]."""
    time.sleep(seconds)
    return [value, os.getpid()]


async def ablob(n: int, seconds: float = 0.0) -> bytes:
    """Wait, then return n bytes (a large result)."""
    await asyncio.sleep(seconds)
    return b"\x5a" * n


def sblob(n: int, seconds: float = 0.0) -> bytes:
    """Sleep in a worker thread, then return n bytes (a large result from a sync function)."""
    time.sleep(seconds)
    return b"\x5a" * n


class AppError(Exception):
    """An exception of an app's own, whose constructor wants two arguments."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code


def raise_kind(kind: str) -> None:
    """Raise an exception of a chosen kind (for the tests of remote exception types)."""
    if kind == "zero":
        1 / 0
    elif kind == "json":
        import json
        json.loads("{")
    elif kind == "file":
        open("/nonexistent/zfabric-test-file")
    elif kind == "app":
        raise AppError(7, "app failure")
    elif kind == "exit":
        raise SystemExit(3)
    elif kind == "stop":
        raise StopIteration("a task may raise this too")
    raise KeyError(kind)


class Shade(enum.Enum):
    """An app's enum: its members travel with their type."""
    LIGHT = "light"
    DARK = "dark"


@dataclasses.dataclass(frozen=True)
class Point:
    """An app's dataclass: its instances travel with their type."""
    x: float
    y: float
    label: str = ""


def type_names(*args: Any, **kwargs: Any) -> list[str]:
    """The type of each argument as the worker sees it (keywords sorted by name)."""
    return [type(a).__name__ for a in args] + [type(kwargs[k]).__name__ for k in sorted(kwargs)]


def unsendable() -> Any:
    """Return a value no fabric can send back."""
    return object()


class Opaque:
    """A class outside the value table: it travels only where both ends opted in to pickle."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return type(other) is Opaque and other.payload == self.payload
