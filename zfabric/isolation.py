"""Sync tasks with a timeout run in child processes that are killed when they overrun (layer 4).

The rule it keeps: a thread cannot be stopped, a process can. A sync task
submitted with ``timeout_s`` runs in one of a few long-lived children
(`python -m zfabric.child --app ...`); when it overruns, or is cancelled,
that child is SIGKILLed and replaced, so the work really stops. The pipe
carries length-prefixed msgpack: no pickle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import struct
import sys
from typing import Any

import msgpack

from .protocol import MAX_FRAME_BYTES, Status, encode_error

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def call(self, request: bytes) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(_LEN.pack(len(request)) + request)
        await self.proc.stdin.drain()
        size = _LEN.unpack(await self.proc.stdout.readexactly(_LEN.size))[0]
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"child sent a {size}-byte frame")
        return msgpack.unpackb(await self.proc.stdout.readexactly(size), raw=False)

    async def exit_code(self) -> int | None:
        """The exit code once the child has exited by itself (None if it is still running after 1 s)."""
        try:
            return await asyncio.wait_for(self.proc.wait(), 1.0)
        except asyncio.TimeoutError:
            return None

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class ChildPool:
    """Up to `size` child processes running sync functions from `apps` with a deadline."""

    def __init__(self, apps: tuple[str, ...], size: int, accept_pickle: bool = False) -> None:
        self.apps = apps
        self.accept_pickle = accept_pickle
        self.size = max(1, size)
        self.killed = 0
        self._idle: list[_Child] = []
        self._slots = asyncio.Semaphore(self.size)
        self._all: set[_Child] = set()

    async def _spawn(self) -> _Child:
        argv = [sys.executable, "-m", "zfabric.child"] + [a for app in self.apps for a in ("--app", app)]
        if self.accept_pickle:
            argv.append("--accept-pickle")
        env = dict(os.environ, ZFABRIC_PARENT_PID=str(os.getpid()))
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, env=env)
        child = _Child(proc)
        self._all.add(child)
        return child

    async def run(self, payload: Any, tries: int, timeout_s: float | None) -> tuple[int, bytes | memoryview, float | None]:
        """(status, payload, retry delay or None); a TIMEOUT when the call overran and its child was killed,
        LOST when the call killed its child."""
        async with self._slots:
            child = self._idle.pop() if self._idle else await self._spawn()
            request = msgpack.packb([bytes(payload), tries], use_bin_type=True)  # the call as it came
            try:
                status, data, delay = await asyncio.wait_for(child.call(request), timeout_s)
            except asyncio.TimeoutError:
                self._discard(child)
                return (Status.TIMEOUT, encode_error(
                    "TaskTimeout", f"task exceeded its timeout of {timeout_s:g} s; its process was killed"), None)
            except asyncio.CancelledError:
                self._discard(child)  # cancelling a running sync task stops it for real
                raise
            except (OSError, EOFError, asyncio.IncompleteReadError, ValueError) as exc:
                code = await child.exit_code()  # before our own kill, which would hide how it ended
                self._discard(child)
                if code is not None:  # it ran this task alone: the task is what killed it
                    return Status.LOST, encode_error("WorkerLost", f"the task killed the process running it "
                                                     f"({_describe_exit(code)})"), None
                return Status.ERROR, encode_error("WorkerError", f"the task's child process failed: {exc}"), None
            self._idle.append(child)
            return status, data, delay

    def _discard(self, child: _Child) -> None:
        child.kill()
        self.killed += 1
        self._all.discard(child)

    async def close(self) -> None:
        for child in list(self._all):
            child.kill()
            await child.proc.wait()
        self._all.clear()
        self._idle.clear()
