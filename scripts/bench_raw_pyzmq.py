#!/usr/bin/env python3
"""The ceiling: a raw pyzmq asyncio pipeline of zfabric's own 4-process shape.

::

    client PUSH ──► PULL scheduler ROUTER ◄──► DEALER worker 1, 2
      ▲ PULL (sink) ◄──────────────────────────── PUSH (results)

Four processes (this one is the client; the scheduler and 2 workers are
spawned), tcp on 127.0.0.1 with random ports, and none of zfabric's
bookkeeping, checks or fault handling: only what the shape costs when done
well. Every socket is drained without waiting (``recv(NOBLOCK)`` until
``zmq.Again``, awaiting only when nothing is queued), tasks travel many per
frame in every direction, and the scheduler reads only small headers: task
bodies pass through it untouched (zero-copy) unless a batch must be split.

Wire: msgpack frames; task and result lists are flat (no per-task lists).

============================  ================================================
client → scheduler            ``[SUBMIT, sink, count]`` + body
                              ``[id, fn, arg, id, fn, arg, …]``
scheduler → worker            ``[TASKS, sink]`` + body
worker → scheduler            ``[CREDIT, n]``: n more tasks may be sent (its
                              window at start, then one per task done)
worker → client sink          ``[id, result, id, result, …]``
client → scheduler → workers  ``[STOP]``
============================  ================================================

The scheduler queues batches and sends each to the worker with the most
credit, splitting a batch only when that credit is smaller. A worker runs
sync functions inline and ``async def`` ones as asyncio tasks, up to its
window at once; results finished in the same loop turn go out in one frame
per sink.

``bench_raw(sizes)`` returns a row in the format of ``bench_peers``.
Usage: ``python scripts/bench_raw_pyzmq.py [--tasks N] [--sleep-tasks N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import math
import multiprocessing
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, cast

import msgpack
import zmq
import zmq.asyncio

import bench_peers
from bench_peers import HOST, SLEEP_S, WORKERS, Row, Sizes, async_sleep, echo, inc, size

SUBMIT, TASKS, CREDIT, STOP = 1, 2, 3, 4
FUNCTIONS: dict[str, Callable[[Any], Any]] = {f.__name__: f for f in (inc, size, echo, async_sleep)}
"""What workers run, by the name that travels in the task."""
ASYNC_FUNCTIONS = frozenset(name for name, f in FUNCTIONS.items() if inspect.iscoroutinefunction(f))
MIN_WINDOW = 10_000
"""Tasks a worker holds at once, at least (raised to half the sleeps)."""
FRAME_TASKS = 1000
FRAME_BYTES = 1 << 20
"""The client packs up to FRAME_TASKS tasks, or about FRAME_BYTES of bytes arguments, per frame."""
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 120.0


class Sock:
    """An asyncio zmq socket plus a blocking shadow of it for non-blocking receives.

    Sends go through the asyncio socket: they complete at once (send high-water
    marks are off; credit bounds every queue but the client's) and, unlike
    sends on the shadow, re-arm a pending receive if the send consumed the
    socket's edge-triggered readiness.
    """

    def __init__(self, ctx: zmq.asyncio.Context, kind: int) -> None:
        self.aio = ctx.socket(kind)
        self.aio.sndhwm = 0
        self.aio.linger = 1000
        self.shadow: zmq.Socket[bytes] = zmq.Socket.shadow(self.aio.underlying)

    async def drain(self) -> list[list[zmq.Frame]]:
        """Wait for one message, then take every message already queued (as frames: no copy)."""
        messages = [await self.aio.recv_multipart(copy=False)]
        try:
            while True:
                messages.append(self.shadow.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:
            return messages

    def post(self, *frames: bytes | zmq.Frame) -> None:
        """Send a message that cannot block (no high-water mark), without copying its frames."""
        sent = cast("asyncio.Future[Any]", self.aio.send_multipart(frames, copy=False))
        if sent.done():
            sent.result()  # raise a send error here rather than lose it


# --- scheduler process ----------------------------------------------------------


class Scheduler:
    """PULL intake plus ROUTER to the workers; a queue and per-worker credit."""

    def __init__(self, ctx: zmq.asyncio.Context, workers: int, conn: Connection) -> None:
        self.intake = Sock(ctx, zmq.PULL)
        self.router = Sock(ctx, zmq.ROUTER)
        self.intake_address = self._bind(self.intake)
        self.router_address = self._bind(self.router)
        self.expected_workers = workers
        self.conn = conn
        self.pending: deque[tuple[str, int, bytes | zmq.Frame]] = deque()
        self.credit: dict[bytes, int] = {}
        self.packer = msgpack.Packer()
        self.stopped = asyncio.Event()

    @staticmethod
    def _bind(sock: Sock) -> str:
        port = sock.aio.bind_to_random_port(f"tcp://{HOST}")
        return f"tcp://{HOST}:{port}"

    async def run(self) -> None:
        """Serve until a STOP arrives, then pass it on to every worker."""
        self.conn.send((self.intake_address, self.router_address))
        loops = [asyncio.create_task(self._intake_loop()), asyncio.create_task(self._router_loop())]
        await self.stopped.wait()
        for loop in loops:
            loop.cancel()
        for worker in self.credit:
            self.router.post(worker, self.packer.pack([STOP]))

    async def _intake_loop(self) -> None:
        while True:
            for header, *body in await self.intake.drain():
                message = msgpack.unpackb(header.buffer)
                if message[0] == STOP:
                    self.stopped.set()
                    return
                _, sink, count = message
                self.pending.append((sink, count, body[0]))
            self._dispatch()

    async def _router_loop(self) -> None:
        while True:
            for identity, frame in await self.router.drain():
                _, credit = msgpack.unpackb(frame.buffer)
                worker = identity.bytes
                if worker not in self.credit and len(self.credit) + 1 == self.expected_workers:
                    self.conn.send("ready")
                self.credit[worker] = self.credit.get(worker, 0) + credit
            self._dispatch()

    def _dispatch(self) -> None:
        """Send queued batches to the workers with the most credit, splitting only to fit."""
        while self.pending and self.credit:
            worker = max(self.credit, key=self.credit.__getitem__)
            free = self.credit[worker]
            if not free:
                return
            sink, count, body = self.pending.popleft()
            if count > free:
                flat = msgpack.unpackb(body.buffer if isinstance(body, zmq.Frame) else body)
                body = self.packer.pack(flat[: 3 * free])
                self.pending.appendleft((sink, count - free, self.packer.pack(flat[3 * free :])))
                count = free
            self.credit[worker] -= count
            self.router.post(worker, self.packer.pack([TASKS, sink]), body)


def _scheduler_main(conn: Connection, workers: int) -> None:
    """Process entry: run a scheduler, reporting its addresses and readiness on ``conn``."""

    async def serve() -> None:
        ctx = zmq.asyncio.Context()
        try:
            await Scheduler(ctx, workers, conn).run()
        finally:
            ctx.destroy(linger=1000)

    asyncio.run(serve())


# --- worker process -------------------------------------------------------------


class Worker:
    """One DEALER to the scheduler; PUSHes results straight to each task's sink."""

    def __init__(self, ctx: zmq.asyncio.Context, router_address: str, window: int) -> None:
        self.ctx = ctx
        self.dealer = Sock(ctx, zmq.DEALER)
        self.dealer.aio.connect(router_address)
        self.window = window
        self.sinks: dict[str, Sock] = {}
        self.results: defaultdict[str, list[Any]] = defaultdict(list)
        self.done = 0
        self.flush_pending = False
        self.running: set[asyncio.Task[Any]] = set()
        self.packer = msgpack.Packer()

    async def run(self) -> None:
        """Run tasks until a STOP arrives."""
        self.dealer.post(self.packer.pack([CREDIT, self.window]))
        while True:
            for header, *body in await self.dealer.drain():
                message = msgpack.unpackb(header.buffer)
                if message[0] == STOP:
                    for task in self.running:
                        task.cancel()
                    return
                self._start(message[1], msgpack.unpackb(body[0].buffer))
            self._flush()

    def _start(self, sink: str, flat: list[Any]) -> None:
        results = self.results[sink]
        for i in range(0, len(flat), 3):
            task_id, name, arg = flat[i : i + 3]
            if name in ASYNC_FUNCTIONS:
                task = asyncio.create_task(FUNCTIONS[name](arg))
                self.running.add(task)
                task.add_done_callback(partial(self._finished, sink, task_id))
            else:
                results += (task_id, FUNCTIONS[name](arg))
                self.done += 1

    def _finished(self, sink: str, task_id: int, task: asyncio.Task[Any]) -> None:
        self.running.discard(task)
        if task.cancelled():
            return
        self.results[sink] += (task_id, task.result())
        self.done += 1
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send every finished result, one frame per sink, and return the credit."""
        self.flush_pending = False
        if not self.done:
            return
        for sink, results in self.results.items():
            if results:
                self._sink(sink).post(self.packer.pack(results))
        self.results.clear()
        self.dealer.post(self.packer.pack([CREDIT, self.done]))
        self.done = 0

    def _sink(self, address: str) -> Sock:
        if address not in self.sinks:
            sock = self.sinks[address] = Sock(self.ctx, zmq.PUSH)
            sock.aio.connect(address)
        return self.sinks[address]


def _worker_main(router_address: str, window: int) -> None:
    """Process entry: run a worker."""

    async def serve() -> None:
        ctx = zmq.asyncio.Context()
        try:
            await Worker(ctx, router_address, window).run()
        finally:
            ctx.destroy(linger=1000)

    asyncio.run(serve())


# --- client (this process) ------------------------------------------------------


class RawFabric:
    """Starts the scheduler and workers; is the client (an ``AsyncPeer``)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.ctx: zmq.asyncio.Context | None = None
        self.packer = msgpack.Packer()

    async def start(self) -> None:
        """Spawn the scheduler and workers, and wait until every worker has joined."""
        spawn = multiprocessing.get_context("spawn")
        conn, child_conn = spawn.Pipe()
        self._spawn(spawn, _scheduler_main, child_conn, WORKERS)
        intake_address, router_address = await self._receive(conn)
        for _ in range(WORKERS):
            self._spawn(spawn, _worker_main, router_address, self.window)
        if await self._receive(conn) != "ready":
            raise RuntimeError("scheduler: unexpected message")
        self.ctx = zmq.asyncio.Context()
        self.intake = Sock(self.ctx, zmq.PUSH)
        self.intake.aio.sndhwm = 1000  # the one queue credit does not bound
        self.intake.aio.connect(intake_address)
        self.sink = Sock(self.ctx, zmq.PULL)
        self.sink_address = f"tcp://{HOST}:{self.sink.aio.bind_to_random_port(f'tcp://{HOST}')}"

    def _spawn(self, spawn: Any, target: Callable[..., None], *args: Any) -> None:
        process = spawn.Process(target=target, args=args, daemon=True)
        process.start()
        self.processes.append(process)

    @staticmethod
    async def _receive(conn: Connection) -> Any:
        """A message from the scheduler's pipe, without blocking the loop."""
        if not await asyncio.to_thread(conn.poll, START_TIMEOUT_S):
            raise TimeoutError("scheduler did not report in time")
        return conn.recv()

    async def stop(self) -> None:
        """Stop the scheduler and workers (killing any that linger) and close the sockets."""
        grace_s = 0.0
        if self.ctx is not None:
            await self.intake.aio.send(self.packer.pack([STOP]))
            grace_s = 10.0
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            await asyncio.to_thread(process.join, max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)

    async def _submit(self, fn: Callable[[Any], Any], items: list[Any]) -> None:
        name = fn.__name__
        item_bytes = max((len(item) for item in items[:1] if isinstance(item, bytes)), default=0)
        per_frame = max(1, min(FRAME_TASKS, FRAME_BYTES // max(1, item_bytes)))
        for start in range(0, len(items), per_frame):
            flat: list[Any] = []
            for task_id in range(start, min(start + per_frame, len(items))):
                flat += (task_id, name, items[task_id])
            header = self.packer.pack([SUBMIT, self.sink_address, len(flat) // 3])
            await self.intake.aio.send_multipart([header, self.packer.pack(flat)], copy=False)

    async def _collect(self, count: int) -> list[Any]:
        results: list[Any] = [None] * count
        received = 0
        while received < count:
            for (frame,) in await self.sink.drain():
                flat = msgpack.unpackb(frame.buffer)
                for task_id, value in zip(flat[::2], flat[1::2], strict=True):
                    results[task_id] = value
                received += len(flat) // 2
        return results

    async def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """Run ``fn`` over ``items``; results in input order (ids are input positions)."""
        submitting = asyncio.create_task(self._submit(fn, items))
        results = await asyncio.wait_for(self._collect(len(items)), CALL_TIMEOUT_S)
        await submitting
        return results

    async def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """Run one task and wait for its result."""
        await self._submit(fn, [item])
        (result,) = await asyncio.wait_for(self._collect(1), CALL_TIMEOUT_S)
        return result

    async def sleeps(self, n: int) -> float:
        """Wall time of n concurrent ``async_sleep(0.5)`` tasks."""
        begin = time.perf_counter()
        await self.map(async_sleep, [SLEEP_S] * n)
        return time.perf_counter() - begin


async def _bench(sizes: Sizes) -> Row:
    fabric = RawFabric(window=max(MIN_WINDOW, math.ceil(sizes.sleeps / WORKERS)))
    begin = time.perf_counter()
    try:
        await fabric.start()
        if await fabric.call(inc, 0) != 1:
            raise RuntimeError("inc: wrong result")
        startup = time.perf_counter() - begin
        figures = await bench_peers.measure_async(fabric, sizes)
        sleeps, budget_note = await bench_peers.bounded_sleeps_async(fabric.sleeps, sizes)
    finally:
        await fabric.stop()
    method = f"batched, non-blocking drain, window {fabric.window:,} per worker"
    return bench_peers.make_row(
        "raw pyzmq, zfabric's shape (ceiling)",
        f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, msgpack {bench_peers.version_of('msgpack')}",
        note="; ".join(filter(None, [method, budget_note])),
        startup_s=startup,
        **figures,
        **sleeps,
    )


def bench_raw(sizes: Sizes) -> Row:
    """The ceiling's row: every figure of ``bench_peers`` over the raw pipeline."""
    return asyncio.run(_bench(sizes))


def main(argv: list[str] | None = None) -> int:
    """Command line: measure the raw pipeline alone and print its row."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks per throughput run")
    parser.add_argument("--sleep-tasks", type=int, default=20_000, help="concurrent 0.5 s sleeps")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; medians are reported")
    args = parser.parse_args(argv)
    row = bench_raw(Sizes.scaled(args.tasks, args.sleep_tasks, args.repeat))
    print(bench_peers.format_table([row]))
    return 0


if __name__ == "__main__":
    # Import this file by name so spawned processes find their entry points
    # as ``bench_raw_pyzmq._scheduler_main`` rather than in ``__main__``.
    import bench_raw_pyzmq

    sys.exit(bench_raw_pyzmq.main())
