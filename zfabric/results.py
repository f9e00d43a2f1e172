"""A worker's way out for results: one PUSH per client sink, batched and bounded (layer 4).

The rule it keeps: a worker never blocks on a sink. Results for a sink are
gathered into one RESULT frame per flush; what the sink cannot take now is
held (up to `result_buffer_bytes`) and retried every few ms; a sink that
makes no progress for `sink_idle_s` is closed and what it held is dropped
and counted — its client's audit finds those tasks and submits them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import zmq

from . import transport
from .config import WorkerConfig
from .execution import MAX_RESULT_BYTES, oversize_error
from .protocol import MAX_BATCH_BYTES, MAX_BATCH_TASKS, PAYLOAD_FRAME_BYTES, Result, Status, attach, encode
from .security import Curve

log = logging.getLogger(__name__)

BACKLOG_RETRY_S = 0.005
ENTRY_OVERHEAD = 16
"""Most bytes one result adds to a RESULT frame besides its payload (msgpack headers of id, status, bin)."""


class _SinkOut:
    __slots__ = ("sender", "results", "frames", "size", "last_used")

    def __init__(self, sender: transport.Sender, now: float) -> None:
        self.sender = sender
        self.results: list[Any] = []
        self.frames: list[Any] = []  # payload frames of the large results in `results`
        self.size = 0
        self.last_used = now


class ResultRouter:
    """Per-sink result batches for one worker (event-loop thread only)."""

    def __init__(self, config: WorkerConfig, curve: Curve | None, heartbeat_ms: int,
                 bad_input: transport.BadInput, on_drop: Callable[[int], None]) -> None:
        self.config = config
        self.curve = curve
        self.heartbeat_ms = heartbeat_ms
        self.bad_input = bad_input
        self.on_drop = on_drop  # called with how many results were dropped
        self._sinks: dict[str, _SinkOut] = {}
        self._retry_scheduled = False

    def add(self, sink: str, task_id: int, status: int, data: bytes | memoryview) -> bool:
        """Queue one result for `sink`; False if that sink address is unusable.

        No RESULT frame passes the frame limit (or the link to the sink drops and the tasks run again, for
        ever): a result that would push a batch over it starts the next frame, and one too large for any
        frame becomes an error saying so. A frame holds at most `MAX_BATCH_TASKS` results, as every batch does.
        """
        out = self._sinks.get(sink) or self._open(sink)
        if out is None:
            return False
        if len(data) > MAX_RESULT_BYTES:  # `result_entry` refuses these already: never let one through
            status, data = Status.ERROR, oversize_error(len(data))
        size = len(data) + ENTRY_OVERHEAD
        if out.results and out.size + size > MAX_RESULT_BYTES:
            self._send(out)  # this one starts the next frame
        out.results += (task_id, status, data if size < PAYLOAD_FRAME_BYTES else attach(data, out.frames))
        out.size += size
        if out.size > MAX_BATCH_BYTES or len(out.results) >= 3 * MAX_BATCH_TASKS:
            self._send(out)
        return True

    def flush(self) -> None:
        """Send every sink's batch (or hold it if the sink is not reading)."""
        for out in self._sinks.values():
            self._send(out)

    @property
    def holding(self) -> bool:
        return any(out.sender.backlog for out in self._sinks.values())

    def retry(self) -> None:
        """Try the held batches again (every few ms while anything is held)."""
        self._retry_scheduled = False
        now = time.monotonic()
        for out in self._sinks.values():
            if out.sender.backlog and out.sender.flush():
                out.last_used = now
        if self.holding:
            self._retry_soon()

    def close_idle(self, now: float) -> None:
        """Close sinks idle (or stuck) for `sink_idle_s`, dropping what they held."""
        for address, out in list(self._sinks.items()):
            if now - out.last_used > self.config.sink_idle_s:
                if out.sender.backlog:
                    log.warning("sink %s has not read for %.0f s; dropping %d result batches (its client will "
                                "ask for those tasks again)", address, now - out.last_used, len(out.sender.backlog))
                    self.on_drop(out.sender.clear())
                out.sender.sock.close()
                del self._sinks[address]

    def close(self) -> None:
        transport.close_all(out.sender.sock for out in self._sinks.values())
        self._sinks.clear()

    def _open(self, address: str) -> _SinkOut | None:
        try:
            sock = transport.open_push(address, self.curve, linger_ms=2000, sndhwm=16,
                                       heartbeat_ms=self.heartbeat_ms)
        except zmq.ZMQError as exc:
            self.bad_input("bad sink address", address, str(exc))
            return None
        sender = transport.Sender(sock, limit=100_000, limit_bytes=self.config.result_buffer_bytes)
        out = self._sinks[address] = _SinkOut(sender, time.monotonic())
        return out

    def _send(self, out: _SinkOut) -> None:
        if not out.results:
            return
        if not out.sender.backlog:
            out.last_used = time.monotonic()
        if not out.sender.send(encode(Result(out.results, tuple(out.frames)))):
            self.on_drop(len(out.results) // 3)
        out.results, out.frames, out.size = [], [], 0
        if out.sender.backlog:
            self._retry_soon()

    def _retry_soon(self) -> None:
        if not self._retry_scheduled:
            self._retry_scheduled = True
            asyncio.get_running_loop().call_later(BACKLOG_RETRY_S, self.retry)
