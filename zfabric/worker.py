"""The worker process: runs tasks from the scheduler, results straight to sinks (layer 5).

The driver of `WorkerState`: it reads the scheduler's socket, feeds each
message to the state machine, runs the tasks it says to start and carries
out its commands. Credit, sessions, sequence numbers, cancels and drain are
decided there; running a task and routing its result are done here.
`async def` tasks run on this event loop; sync functions run in a pool of
threads (or inline with ``threads=0``); suspects and sync tasks with a
timeout run in child processes. Results are batched per sink and pushed
before the DONE that reports them, so the scheduler never forgets a task
whose result was not sent. A DONE the scheduler does not need yet waits up
to `DONE_LINGER_S`, so a lone task's round trip carries no DONE beside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import transport
from .config import FabricAddress, WorkerConfig, local_ip_towards
from .errors import ProtocolError
from .execution import (
    InlinePolicy,
    call_sync,
    check_options,
    error_entry,
    result_entry,
    retry_delay,
)
from .isolation import ChildPool
from .protocol import (Done, Drain, Kind, Status, WorkerBye, WorkerHeartbeat, WorkerHello, decode_call,
                       decode_error, encode, encode_error)
from .registry import NotAllowed, Registry
from .results import ResultRouter
from .routing import checked_route
from .security import Curve
from .service import Service
from .threads import SyncThreads
from .values import NO_PICKLE, classes_of
from .worker_state import (
    Interrupt,
    Malformed,
    SendBye,
    SendDone,
    SendDrain,
    SendHello,
    Start,
    WorkerState,
)

log = logging.getLogger(__name__)

_SCHEDULER_KINDS = (Kind.DISPATCH, Kind.HEARTBEAT, Kind.REGISTER, Kind.CANCEL)
TICK_S = 0.25
"""The ticker's longest sleep (a shorter heartbeat shortens it): 100 idle workers waking every 0.1 s took half
a core of a 2-core machine."""
DONE_LINGER_S = 0.01
"""A DONE the scheduler does not need yet (it still sees over half this worker's slots free and nothing is
to be retried) waits up to this long, gathering more: one message per many tasks, and none on the path
of a lone task's latency."""


class Worker(Service):
    """A worker: `async with Worker(WorkerConfig(address, app=("myapp",))) as w: await w.wait_closed()`."""

    def __init__(self, config: WorkerConfig | None = None, registry: Registry | None = None) -> None:
        super().__init__()
        self.config = config or WorkerConfig()
        checked_route(self.config.tags, self.config.resources)  # ConfigError if either is malformed
        self.registry = registry or Registry(self.config.app)
        self.name = self.config.name or f"{socket.gethostname()}-{os.getpid()}"
        self.registered = asyncio.Event()
        self.bad_input = transport.BadInput("worker")
        timing = self.config.timing
        self.state = WorkerState(self.config.concurrency, timing.heartbeat_s, timing.scheduler_timeout_s, self.name)
        self.results_dropped = 0
        self._runners: dict[int, asyncio.Task[None]] = {}  # task id -> the asyncio.Task running it, if any
        self._last_beat = float("-inf")
        self._last_sent = float("-inf")  # any message tells the scheduler we are alive
        self._flush_scheduled = False
        self._done_waiting = False
        self._handling = False
        self._inline = InlinePolicy()
        self._isolated: ChildPool | None = None
        self._classes = classes_of(self.registry.module)  # the enums and dataclasses arguments may hold

    @property
    def counts(self) -> dict[str, int]:
        return {**self.state.counts, "results_dropped": self.results_dropped}

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> Worker:
        self._loop = asyncio.get_running_loop()
        address = FabricAddress.parse(self.config.address)
        ip = local_ip_towards(address.host) if address.host else "ipc"
        self._host = f"{socket.gethostname()}/{ip}"
        self._curve = Curve(self.config.curve, "worker") if self.config.curve is not None else None
        self._hb_ms = int(self.config.timing.heartbeat_s * 1000)
        self._results = ResultRouter(self.config, self._curve, self._hb_ms, self.bad_input, self._dropped)
        self._connect(address.workers)
        self._threads = SyncThreads(self.config.threads, self._thread_outcome)
        self.state.heard(time.monotonic())
        self.state.hello(time.monotonic())
        self._carry_out()
        self._tasks = [asyncio.create_task(self._reader.run(self._stop)), asyncio.create_task(self._ticker())]
        log.info("worker %s joining %s (concurrency %d, threads %d, apps %s)", self.name, address.workers,
                 self.config.concurrency, self.config.threads, ", ".join(self.registry.modules) or "none")
        return self

    def _connect(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._dealer = transport.make_socket(zmq.DEALER, connect=True, linger_ms=2000, sndhwm=100_000,
                                             routing_id=transport.new_routing_id(), heartbeat_ms=self._hb_ms)
        self._dealer.setsockopt(zmq.IMMEDIATE, 1)
        if self._curve is not None:
            self._curve.connect_to(self._dealer, self._curve.scheduler_key)
        self._dealer.connect(endpoint)
        self._to_scheduler = transport.Sender(self._dealer, limit=100_000)
        self._reader = transport.Reader(self._dealer, self._on_scheduler, "scheduler", self.bad_input)

    async def stop(self) -> None:
        """Stop whatever `start` got to (it may have failed half-way, on a bad address say)."""
        await self._end_tasks()
        for runner in list(self._runners.values()):
            runner.cancel()
        threads: SyncThreads | None = getattr(self, "_threads", None)
        if threads is not None:
            threads.close()
        if self._isolated is not None:
            await self._isolated.close()
        transport.close_all([getattr(self, "_dealer", None)])
        results: ResultRouter | None = getattr(self, "_results", None)
        if results is not None:
            results.close()

    async def drain(self) -> None:
        """Stop taking work, let running tasks finish within ``grace_s``, hand the rest back, leave."""
        state = self.state
        if state.draining:
            return
        state.drain(self._threads.withdraw_all())
        self._carry_out()
        log.info("worker %s draining: %d running", self.name, len(state.running))
        deadline = time.monotonic() + self.config.grace_s
        while state.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # sync-ok: polls the running set until the grace period ends
        self._flush()
        while self._results.holding and time.monotonic() < deadline:
            self._results.retry()
            await asyncio.sleep(0.05)  # sync-ok: polls the held results until the grace period ends
        left = state.give_up()
        if left:
            log.warning("worker %s: %d tasks still running after %.1f s grace; handed them back",
                        self.name, len(left), self.config.grace_s)
            for task_id in left:
                runner = self._runners.pop(task_id, None)
                if runner is not None:
                    runner.cancel()
        self._carry_out()
        self._to_scheduler.flush()
        self._stop.set()

    # ---- the scheduler link ---------------------------------------------------------------

    def _carry_out(self) -> None:
        """Do what the state machine decided, in order."""
        for command in self.state.take():
            if type(command) is SendDone:
                self._results.flush()  # the results first: the DONE makes the scheduler forget these tasks
                self._tell_scheduler(encode(Done(command.session, command.seq, command.credit, command.finished,
                                                 command.n_failed, command.retries, command.errors)))
            elif type(command) is Interrupt:
                self._interrupt(command.task_id, command.run)
            elif type(command) is SendHello:
                self.registered.clear()
                self._to_scheduler.backlog.clear()  # what the old session had not sent is void
                self._tell_scheduler(encode(WorkerHello(self.name, command.session, command.free, command.running,
                                                        os.getpid(), self._host, list(self.config.tags),
                                                        self.config.resources)))
            elif type(command) is SendDrain:
                self._tell_scheduler(encode(Drain(command.session, command.handed_back)))
            elif type(command) is SendBye:
                self._tell_scheduler(encode(WorkerBye(command.session)))
            elif type(command) is Malformed:
                self.bad_input("malformed dispatch", "scheduler", command.what)
        if self.state.registered:
            self.registered.set()

    def _tell_scheduler(self, frame: bytes) -> None:
        self._last_sent = time.monotonic()
        self._to_scheduler.send(frame)
        self._reader.after_send()  # a send on the DEALER can swallow its read edge

    def _on_scheduler(self, batch: list[list[Any]]) -> None:
        now = time.monotonic()
        self.state.heard(now)
        self._inline.new_batch()
        self._handling = True
        try:
            for _, kind, f in transport.messages(batch, _SCHEDULER_KINDS, self.bad_input, "scheduler"):
                if kind == Kind.DISPATCH:
                    starts = self.state.on_dispatch(f.epoch, f.session, f.seq, f.groups, now, f.frames)
                    self._carry_out()
                    for start in starts:
                        self._start(start)
                    if self.state.credit:
                        self._schedule_flush()  # duplicates and malformed entries give their slots back too
                elif kind == Kind.HEARTBEAT:
                    self.state.on_heartbeat(f.epoch, f.session, f.dispatch_seq, now)
                elif kind == Kind.REGISTER:
                    self.state.on_register(f.epoch, now)
                elif kind == Kind.CANCEL:
                    self.state.on_cancel(f.ids)
                self._carry_out()
        finally:
            self._handling = False
            if self._flush_scheduled:
                self._flush(done_now=False)  # results of inline tasks leave before the loop turns

    # ---- running tasks --------------------------------------------------------------------

    def _start(self, start: Start) -> None:
        task_id, run, sink, tries, payload, isolate = start
        try:
            name, args, kwargs, options = decode_call(payload, self._classes, self.config.accept_pickle)
            problem = check_options(options) if options else None
            if problem:
                raise ProtocolError(problem)
            if options and options.get("serializer") == "pickle" and not self.config.accept_pickle:
                raise ProtocolError(NO_PICKLE)  # (its result would go back pickled)
            fn = self.registry.resolve(name)
        except NotAllowed as exc:
            self._complete(task_id, run, sink, Status.REJECTED, encode_error("NotAllowed", str(exc)), failed=True)
            return
        except ProtocolError as exc:
            self._complete(task_id, run, sink, Status.REJECTED, encode_error("BadTask", str(exc)), failed=True)
            return
        is_async = self.registry.is_async(fn)
        if isolate or (not is_async and options and options.get("timeout_s") is not None):
            # a suspect (it was on dying workers: if it kills a process, let that be only a child), or a
            # sync task with a timeout (killed if it overruns)
            self._runners[task_id] = self._loop.create_task(
                self._run_isolated(task_id, run, sink, tries, payload, options))
        elif is_async:
            self._runners[task_id] = self._loop.create_task(
                self._run_async(task_id, run, sink, tries, fn, args, kwargs, options))
        elif self.config.threads == 0 or self._inline.may_inline(fn):
            started = time.perf_counter()
            outcome = call_sync(fn, args, kwargs, options, tries)
            self._inline.observed(fn, time.perf_counter() - started, inline=True)
            self._sync_outcome(task_id, run, sink, *outcome)
        else:
            self._threads.submit(task_id, run, sink, tries, fn, args, kwargs, options)

    async def _run_async(self, task_id: int, run: int, sink: str, tries: int, fn: Callable[..., Any],
                         args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        # A cancel can land before the first step, when none of this runs: `_interrupt` has then finished
        # the task already. Every outcome below names its run, so none finishes a task twice.
        timeout = options.get("timeout_s")
        try:
            if timeout is None:
                value = await fn(*args, **kwargs)
            else:
                value = await asyncio.wait_for(fn(*args, **kwargs), timeout)
        except asyncio.CancelledError:
            if not self._stop.is_set():  # the task cancelled itself (else `_interrupt` finished it already)
                self._complete(task_id, run, sink, Status.CANCELLED, encode_error("TaskCancelled", "cancelled"))
            return
        except TimeoutError:
            self._complete(task_id, run, sink, Status.TIMEOUT, encode_error(
                "TaskTimeout", f"task exceeded its timeout of {timeout} s and was cancelled"), failed=True)
            return
        except BaseException as exc:
            delay = retry_delay(exc, options, tries)
            if delay is not None:
                self._retry(task_id, run, delay)
            else:
                self._complete(task_id, run, sink, *error_entry(exc), failed=True)
            return
        self._complete(task_id, run, sink, *result_entry(value, options.get("serializer") == "pickle"))

    async def _run_isolated(self, task_id: int, run: int, sink: str, tries: int, payload: Any,
                            options: dict[str, Any]) -> None:
        """A sync task with a timeout, or a suspect: in a child process (which decodes the call itself)."""
        if self._isolated is None:
            self._isolated = ChildPool(tuple(self.registry.sources), self.config.timeout_procs,
                                       self.config.accept_pickle)
        try:
            status, data, delay = await self._isolated.run(payload, tries, options.get("timeout_s"))
        except asyncio.CancelledError:
            if not self._stop.is_set():
                self._complete(task_id, run, sink, Status.CANCELLED, encode_error("TaskCancelled", "cancelled"))
            return
        self._sync_outcome(task_id, run, sink, status, data, delay)

    def _thread_outcome(self, outcome: tuple[int, int, str, int, bytes | memoryview, float | None, Any, float]) -> None:
        task_id, run, sink, status, data, delay, fn, seconds = outcome
        self._inline.observed(fn, seconds, inline=False)
        self._sync_outcome(task_id, run, sink, status, data, delay)

    def _sync_outcome(self, task_id: int, run: int, sink: str, status: int, data: bytes | memoryview,
                      delay: float | None) -> None:
        if delay is not None:
            self._retry(task_id, run, delay)
        else:
            self._complete(task_id, run, sink, status, data, failed=status != Status.OK)

    def _interrupt(self, task_id: int, run: int) -> None:
        """A cancel: the task is done here the moment it arrives, so its slot comes back whatever its
        coroutine does next (one cancelled before its first step never runs its own handler). A sync call
        can be taken back only before a thread starts it."""
        runner = self._runners.get(task_id)
        sink = self.state.sink_of(task_id) or ""
        if runner is not None:
            self._complete(task_id, run, sink, Status.CANCELLED, encode_error("TaskCancelled", "cancelled"))
            runner.cancel()
        elif self._threads.withdraw(task_id):
            self._complete(task_id, run, sink, Status.CANCELLED, encode_error("TaskCancelled", "cancelled"))

    # ---- outcomes -------------------------------------------------------------------------

    def _complete(self, task_id: int, run: int, sink: str, status: int, data: bytes | memoryview, failed: bool = False) -> None:
        """Finish this run of a task, once: its result to its sink, its slot back in the next DONE."""
        state = self.state
        if not state.finish(task_id, run, failed, _error_of(data) if failed else None):
            return  # finished already (cancelled, handed back at drain): a late outcome changes nothing
        if self._runners:
            self._runners.pop(task_id, None)
        if not self._results.add(sink, task_id, status, data):
            self._dropped(1)  # an unusable sink address: the result is lost, but never the slot
            if not failed:
                state.result_lost()
        if not self._flush_scheduled:
            self._schedule_flush()

    def _retry(self, task_id: int, run: int, delay: float) -> None:
        if self.state.retry(task_id, run, delay):
            self._runners.pop(task_id, None)
            self._schedule_flush()

    def _dropped(self, n: int) -> None:
        self.results_dropped += n

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if not self._handling:  # else `_on_scheduler` flushes when the batch is done
                self._loop.call_soon(self._flush, False)

    def _flush(self, done_now: bool = True) -> None:
        """Results to their sinks first, then DONE to the scheduler (unless it can wait)."""
        self._flush_scheduled = False
        self._results.flush()
        if done_now or self.state.done_due():
            self._send_done()
        elif not self._done_waiting:
            self._done_waiting = True
            self._loop.call_later(DONE_LINGER_S, self._send_done)

    def _send_done(self) -> None:
        self._done_waiting = False
        self.state.send_done()
        self._carry_out()

    async def _ticker(self) -> None:
        timing = self.config.timing
        state = self.state
        tick_s = min(TICK_S, timing.heartbeat_s / 2)
        while not self._stop.is_set():
            now = time.monotonic()
            if now - self._last_beat >= timing.heartbeat_s:
                self._last_beat = now
                if self._to_scheduler.backlog:
                    self._to_scheduler.flush()
                elif now - self._last_sent >= timing.heartbeat_s:  # a DONE just sent said as much
                    try:  # a heartbeat that cannot go now is useless later: never queue it
                        self._dealer.send(encode(WorkerHeartbeat(state.session, state.done_seq,
                                                                  dict(self.bad_input.counts))), zmq.NOBLOCK)
                    except zmq.Again:
                        pass
            state.tick(now)
            self._carry_out()
            self._reader.wake()
            self._results.close_idle(now)
            await asyncio.sleep(tick_s)


def _error_of(data: Any) -> tuple[str, str] | None:
    """A failure's (type, message) from its error payload, for the scheduler's status and events."""
    try:
        type_name, message, _ = decode_error(data)
    except ProtocolError:
        return None
    return type_name, message
