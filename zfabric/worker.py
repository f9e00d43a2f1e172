"""The worker process: runs tasks from the scheduler, results straight to sinks (layer 4).

The rule it keeps: a slot is credit. The worker announces its free slots at
HELLO; every task it finishes (or hands back for a retry) returns one slot in
its next DONE. `async def` tasks run on this event loop; sync functions run
in a pool of threads (or inline with ``threads=0``). Results are batched per
sink and pushed before the DONE that reports them, so the scheduler never
forgets a task whose result was not sent. A DONE the scheduler does not need
yet (it still sees most of this worker's slots free) waits up to
`DONE_LINGER_S`, so a lone task's round trip carries no DONE beside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Callable

import zmq

from . import transport
from .config import FabricAddress, WorkerConfig, local_ip_towards
from .errors import ProtocolError
from .execution import InlinePolicy, call_sync, check_options, error_entry, result_entry, retry_delay
from .protocol import MAX_BATCH_TASKS, Kind, Status, decode_call, encode, encode_error
from .isolation import ChildPool
from .registry import NotAllowed, Registry
from .results import ResultRouter
from .threads import SyncThreads
from .security import Curve
from .service import Service

log = logging.getLogger(__name__)

_SCHEDULER_KINDS = (Kind.DISPATCH, Kind.HEARTBEAT, Kind.REGISTER, Kind.CANCEL)
TICK_S = 0.1
DONE_LINGER_S = 0.01
"""A DONE the scheduler does not need yet (it still sees over half this worker's slots free and nothing is
to be retried) waits up to this long, gathering more: one message per many tasks, and none on the path
of a lone task's latency."""


class Worker(Service):
    """A worker: `async with Worker(WorkerConfig(address, app=("myapp",))) as w: await w.wait_closed()`."""

    def __init__(self, config: WorkerConfig | None = None, registry: Registry | None = None) -> None:
        super().__init__()
        self.config = config or WorkerConfig()
        self.registry = registry or Registry(self.config.app)
        self.name = self.config.name or f"{socket.gethostname()}-{os.getpid()}"
        self.registered = asyncio.Event()
        self.bad_input = transport.BadInput("worker")
        self.counts = {"done": 0, "failed": 0, "retried": 0, "results_dropped": 0}
        self._draining = False
        self._session = 0
        self._epoch: int | None = None
        self._dispatch_seq = 0
        self._done_seq = 0
        self._last_hello = float("-inf")
        self._last_heard = time.monotonic()
        self._last_beat = float("-inf")
        self._running: dict[int, Any] = {}  # task id -> its asyncio.Task, or its sink (a sync call), or None
        self._task_sinks: dict[int, str] = {}  # sink of each task running as an asyncio.Task (to cancel it)
        self._finished: list[int] = []
        self._credit = 0
        self._n_failed = 0
        self._retries: list[Any] = []
        self._flush_scheduled = False
        self._done_waiting = False
        self._handling = False
        self._inline = InlinePolicy()
        self._isolated: ChildPool | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> "Worker":
        self._loop = asyncio.get_running_loop()
        address = FabricAddress.parse(self.config.address)
        ip = local_ip_towards(address.host) if address.host else "ipc"
        self._host = f"{socket.gethostname()}/{ip}"
        self._curve = Curve(self.config.curve, "worker") if self.config.curve is not None else None
        self._hb_ms = int(self.config.timing.heartbeat_s * 1000)
        self._results = ResultRouter(self.config, self._curve, self._hb_ms, self.bad_input, self._dropped)
        self._connect(address.workers)
        self._threads = SyncThreads(self.config.threads, self._thread_outcome)
        self._hello()
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
        for task in list(self._running.values()):
            if isinstance(task, asyncio.Task):
                task.cancel()
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
        if self._draining:
            return
        self._draining = True
        handed_back = self._threads.withdraw_all()
        for tid in handed_back:
            self._running.pop(tid, None)
        self._tell_scheduler(encode(Kind.DRAIN, self._session, handed_back))
        log.info("worker %s draining: %d tasks handed back, %d running", self.name, len(handed_back),
                 len(self._running))
        deadline = time.monotonic() + self.config.grace_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # sync-ok: polls the running set until the grace period ends
        self._flush()
        while self._results.holding and time.monotonic() < deadline:
            self._results.retry()
            await asyncio.sleep(0.05)  # sync-ok: polls the held results until the grace period ends
        if self._running:
            left = list(self._running)
            log.warning("worker %s: %d tasks still running after %.1f s grace; handing them back",
                        self.name, len(left), self.config.grace_s)
            for task in list(self._running.values()):
                if isinstance(task, asyncio.Task):
                    task.cancel()
            self._running.clear()
            self._tell_scheduler(encode(Kind.DRAIN, self._session, left))
        self._tell_scheduler(encode(Kind.WORKER_BYE, self._session))
        self._to_scheduler.flush()
        self._stop.set()

    # ---- scheduler link -------------------------------------------------------------------

    def _hello(self) -> None:
        if self._finished or self._retries:
            self._flush()  # report what finished under the old session first: it need not run again
        self._session += 1
        self._dispatch_seq = 0
        self._done_seq = 0
        self._last_hello = time.monotonic()
        self._finished, self._retries, self._credit, self._n_failed = [], [], 0, 0
        free = 0 if self._draining else max(0, self.config.concurrency - len(self._running))
        self._to_scheduler.backlog.clear()
        self._tell_scheduler(encode(Kind.WORKER_HELLO, self.name, self._session, free, list(self._running),
                                       os.getpid(), self._host))

    def _tell_scheduler(self, frame: bytes) -> None:
        self._to_scheduler.send(frame)
        self._reader.after_send()  # a send on the DEALER can swallow its read edge

    def _on_scheduler(self, batch: list[list[bytes]]) -> None:
        self._last_heard = time.monotonic()
        self._inline.new_batch()
        self._handling = True
        try:
            self._handle_scheduler(batch)
        finally:
            self._handling = False
            if self._flush_scheduled:
                self._flush(done_now=False)  # results of inline tasks leave before the loop turns

    def _handle_scheduler(self, batch: list[list[bytes]]) -> None:
        for _, kind, f in transport.messages(batch, _SCHEDULER_KINDS, self.bad_input, "scheduler"):
            if kind == Kind.DISPATCH:
                self._on_dispatch(*f)
            elif kind == Kind.HEARTBEAT:
                self._on_heartbeat(*f)
            elif kind == Kind.REGISTER:
                if time.monotonic() - self._last_hello > self.config.timing.heartbeat_s:
                    log.info("worker %s: scheduler (epoch %x) asks us to register", self.name, f[0])
                    self._hello()
            elif kind == Kind.CANCEL:
                self._cancel(f[2])

    def _on_heartbeat(self, epoch: int, session: int, dispatch_seq: int) -> None:
        if session != self._session:
            return
        if self._epoch != epoch:
            if self._epoch is not None:
                log.info("worker %s: new scheduler epoch %x", self.name, epoch)
            self._epoch = epoch
        if dispatch_seq != self._dispatch_seq:
            log.warning("worker %s: scheduler sent DISPATCH %d, we saw %d; re-registering",
                        self.name, dispatch_seq, self._dispatch_seq)
            self._hello()
            return
        self.registered.set()

    def _on_dispatch(self, epoch: int, session: int, seq: int, groups: list[Any]) -> None:
        if session != self._session:
            return  # sent before our latest HELLO; the scheduler requeued those tasks
        if self._draining:  # crossed our DRAIN on the wire: hand it straight back
            self._dispatch_seq = seq
            back: list[Any] = []
            for group in groups:
                if type(group) is list and len(group) in (2, 3) and type(group[1]) is list:
                    back += group[1][0::3]
            self._tell_scheduler(encode(Kind.DRAIN, self._session, back))
            return
        if seq != self._dispatch_seq + 1:
            log.warning("worker %s: DISPATCH %d after %d; re-registering", self.name, seq, self._dispatch_seq)
            self._hello()
            return
        self._dispatch_seq = seq
        self._epoch = epoch
        self.registered.set()
        for group in groups:
            if (type(group) is not list or len(group) not in (2, 3) or type(group[0]) is not str
                    or type(group[1]) is not list):
                self.bad_input("malformed dispatch group", "scheduler", "not [sink, tasks]")
                continue
            sink, flat = group[0], group[1]
            isolate = len(group) == 3 and group[2] == 1  # suspects: run in a child process
            for i in range(0, len(flat) - 2, 3):
                self._start_task(flat[i], sink, flat[i + 1], flat[i + 2], isolate)

    # ---- running tasks --------------------------------------------------------------------

    def _start_task(self, task_id: Any, sink: str, tries: Any, payload: Any, isolate: bool = False) -> None:
        if type(task_id) is not int or type(tries) is not int or type(payload) is not bytes:
            self.bad_input("malformed task", "scheduler", "not [id, tries, payload]")
            self._credit += 1
            return
        if task_id in self._running:
            self._credit += 1  # already running here (a redelivery): one copy is enough
            return
        try:
            name, args, kwargs, options = decode_call(payload)
            problem = check_options(options) if options else None
            if problem:
                raise ProtocolError(problem)
            fn = self.registry.resolve(name)
        except NotAllowed as exc:
            self._complete(task_id, sink, Status.REJECTED, encode_error("NotAllowed", str(exc)), failed=True,
                           started=False)
            return
        except ProtocolError as exc:
            self._complete(task_id, sink, Status.REJECTED, encode_error("BadTask", str(exc)), failed=True,
                           started=False)
            return
        if isolate or self.registry.is_async(fn) or options.get("timeout_s") is not None:
            self._task_sinks[task_id] = sink
        if isolate:  # a suspect (on two dying workers): if it kills a process, let it be only a child
            self._running[task_id] = self._loop.create_task(
                self._run_isolated(task_id, sink, tries, name, args, kwargs, options))
        elif self.registry.is_async(fn):
            self._running[task_id] = self._loop.create_task(
                self._run_async(task_id, sink, tries, fn, args, kwargs, options))
        elif options.get("timeout_s") is not None:
            self._running[task_id] = self._loop.create_task(
                self._run_isolated(task_id, sink, tries, name, args, kwargs, options))
        elif self.config.threads == 0 or self._inline.may_inline(fn):
            self._running[task_id] = None
            started = time.perf_counter()
            outcome = call_sync(fn, args, kwargs, options, tries)
            self._inline.observed(fn, time.perf_counter() - started, inline=True)
            self._sync_outcome(task_id, sink, *outcome)
        else:
            self._running[task_id] = sink
            self._threads.submit(task_id, sink, tries, fn, args, kwargs, options)

    def _owns(self, task_id: int) -> bool:
        """Whether the running asyncio.Task is still the one this worker runs `task_id` as: once a cancel (or
        a drain) has finished the task, or the id runs again as a new Task, its old coroutine's outcome is void."""
        return self._running.get(task_id) is asyncio.current_task()

    async def _run_async(self, task_id: int, sink: str, tries: int, fn: Callable[..., Any], args: list[Any],
                         kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        # A cancel can land before the first step, when none of this runs: `_cancel` has then finished the
        # task already. Every outcome below is checked with `_owns`, so none finishes a task twice.
        timeout = options.get("timeout_s")
        try:
            if timeout is None:
                value = await fn(*args, **kwargs)
            else:
                value = await asyncio.wait_for(fn(*args, **kwargs), timeout)
        except asyncio.CancelledError:
            if not self._stop.is_set() and self._owns(task_id):  # the task cancelled itself
                self._complete(task_id, sink, Status.CANCELLED, encode_error("TaskCancelled", "cancelled"))
            return
        except asyncio.TimeoutError:
            if self._owns(task_id):
                self._complete(task_id, sink, Status.TIMEOUT, encode_error(
                    "TaskTimeout", f"task exceeded its timeout of {timeout} s and was cancelled"), failed=True)
            return
        except BaseException as exc:
            if not self._owns(task_id):
                return
            delay = retry_delay(exc, options, tries)
            if delay is not None:
                self._retry(task_id, delay)
            else:
                status, data = error_entry(exc)
                self._complete(task_id, sink, status, data, failed=True)
            return
        if self._owns(task_id):
            self._complete(task_id, sink, *result_entry(value))

    async def _run_isolated(self, task_id: int, sink: str, tries: int, name: str, args: list[Any],
                            kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        """A sync task with a timeout (killed if it overruns), or a suspect: in a child process."""
        if self._isolated is None:
            self._isolated = ChildPool(tuple(self.registry.modules), self.config.timeout_procs)
        try:
            status, data, delay = await self._isolated.run(name, args, kwargs, options, tries, options.get("timeout_s"))
        except asyncio.CancelledError:
            if not self._stop.is_set() and self._owns(task_id):
                self._complete(task_id, sink, Status.CANCELLED, encode_error("TaskCancelled", "cancelled"))
            return
        if self._owns(task_id):
            self._sync_outcome(task_id, sink, status, data, delay)

    def _thread_outcome(self, outcome: tuple[int, str, int, bytes, float | None, Any, float]) -> None:
        task_id, sink, status, data, delay, fn, seconds = outcome
        self._inline.observed(fn, seconds, inline=False)
        self._sync_outcome(task_id, sink, status, data, delay)

    def _sync_outcome(self, task_id: int, sink: str, status: int, data: bytes, delay: float | None) -> None:
        if delay is not None:
            self._retry(task_id, delay)
        else:
            self._complete(task_id, sink, status, data, failed=status != Status.OK)

    def _cancel(self, ids: list[Any]) -> None:
        """The task is done here the moment its cancel arrives: its slot comes back whatever its coroutine
        does next (a task cancelled before its first step never runs its own handler), and any later outcome
        of it is ignored (`_complete` only finishes what is still running)."""
        for task_id in ids:
            running = self._running.get(task_id) if type(task_id) is int else None
            if isinstance(running, asyncio.Task):
                self._complete(task_id, self._task_sinks.get(task_id, ""), Status.CANCELLED,
                               encode_error("TaskCancelled", "cancelled"))
                running.cancel()
            elif type(running) is str and self._threads.withdraw(task_id):
                self._complete(task_id, running, Status.CANCELLED, encode_error("TaskCancelled", "cancelled"))

    # ---- outcomes -------------------------------------------------------------------------

    def _complete(self, task_id: int, sink: str, status: int, data: bytes, failed: bool = False,
                  started: bool = True) -> None:
        """Finish a task once: its result to its sink, its slot back in the next DONE."""
        if started:
            if task_id not in self._running:
                return  # finished already (cancelled, handed back at drain): a late outcome changes nothing
            del self._running[task_id]
        self._task_sinks.pop(task_id, None)
        if not self._results.add(sink, task_id, status, data):
            self._dropped(1)  # an unusable sink address: the result is lost, but never the slot
            failed = True
        self._finished.append(task_id)
        self._credit += 1
        if failed:
            self._n_failed += 1
            self.counts["failed"] += 1
        else:
            self.counts["done"] += 1
        self._schedule_flush()

    def _dropped(self, n: int) -> None:
        self.counts["results_dropped"] += n

    def _retry(self, task_id: int, delay: float) -> None:
        if self._running.pop(task_id, False) is False:
            return  # finished already: a late outcome changes nothing
        self._task_sinks.pop(task_id, None)
        self._retries += (task_id, delay)
        self._credit += 1
        self.counts["retried"] += 1
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if not self._handling:  # else `_on_scheduler` flushes when the batch is done
                self._loop.call_soon(self._flush, False)

    def _flush(self, done_now: bool = True) -> None:
        """Results to their sinks first, then DONE to the scheduler (unless it can wait)."""
        self._flush_scheduled = False
        self._results.flush()
        if done_now or not self._done_can_wait():
            self._send_done()
        elif not self._done_waiting:
            self._done_waiting = True
            self._loop.call_later(DONE_LINGER_S, self._send_done)

    def _done_can_wait(self) -> bool:
        seen_free = self.config.concurrency - len(self._running) - self._credit  # as the scheduler sees it
        return (not self._retries and not self._draining and len(self._finished) < MAX_BATCH_TASKS
                and seen_free > self.config.concurrency // 2)

    def _send_done(self) -> None:
        self._done_waiting = False
        if self._finished or self._retries or self._credit:
            self._done_seq += 1
            self._tell_scheduler(encode(Kind.DONE, self._session, self._done_seq, self._credit,
                                           self._finished, self._n_failed, self._retries))
            self._finished, self._retries, self._credit, self._n_failed = [], [], 0, 0

    async def _ticker(self) -> None:
        timing = self.config.timing
        while not self._stop.is_set():
            now = time.monotonic()
            if now - self._last_beat >= timing.heartbeat_s:
                self._last_beat = now
                if self._to_scheduler.backlog:
                    self._to_scheduler.flush()
                else:
                    try:  # a heartbeat that cannot go now is useless later: never queue it
                        self._dealer.send(encode(Kind.WORKER_HEARTBEAT, self._session, self._done_seq), zmq.NOBLOCK)
                    except zmq.Again:
                        pass
            if now - self._last_heard > timing.scheduler_timeout_s and now - self._last_hello > timing.scheduler_timeout_s:
                log.warning("worker %s: scheduler silent for %.1f s; saying hello again", self.name,
                            now - self._last_heard)
                self.registered.clear()
                self._hello()
            self._reader.wake()
            self._results.close_idle(now)
            await asyncio.sleep(TICK_S)
