"""The client: submits tasks, owns the sink their results come back to (layer 4).

The rule it keeps: the client is the durable copy of its tasks. Every
unfinished task keeps its encoded call in its handle; whenever a scheduler
WELCOMEs this client (first contact, a restarted scheduler, or one that had
forgotten us) every task sent and not finished is sent again under the same
id. The scheduler ignores ids it already holds, and the sink drops a second
result for an id, so the caller sees exactly one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator

import zmq

from . import transport
from .config import ClientConfig, FabricAddress, local_ip_towards
from .client_state import (ENVELOPE_HEADROOM, MAX_CALL_BYTES, ClientState, SayHello, SendAudit, SendCancel,
                           SendSubmit)
from .errors import ConfigError, FabricUnreachable, SubmitError
from .handle import Handle
from .protocol import (MAX_BATCH_TASKS, MAX_FRAME_BYTES, Audit, Cancel, ClientBye, ClientHello, Kind, StatusRequest,
                       Submit, describe_unencodable, encode, encode_call)
from .registry import function_name
from .submitter import Submitter, TaskRef
from .security import Curve
from .service import Service

if TYPE_CHECKING:
    from .syncclient import SyncClient

log = logging.getLogger(__name__)

_SINK_KINDS = (Kind.WELCOME, Kind.ACCEPTED, Kind.REJECTED, Kind.HEARTBEAT, Kind.RESULT, Kind.STATUS_REPLY,
               Kind.MISSING)
AUDIT_CHUNK = 50_000
__all__ = ["AUDIT_CHUNK", "ENVELOPE_HEADROOM", "MAX_CALL_BYTES", "Client"]


class Client(Submitter, Service):
    """Connects to a fabric: ``async with zfabric.Client("tcp://host:7100") as client: ...``."""

    audit_chunk = AUDIT_CHUNK
    """Task ids per AUDIT frame (one audit round sends as many frames as it needs)."""

    def __init__(self, address: str | ClientConfig | None = None, **options: Any) -> None:
        if isinstance(address, ClientConfig):
            config = address
        else:
            config = ClientConfig(**options) if address is None else ClientConfig(address=address, **options)
        FabricAddress.parse(config.address)
        if config.serializer not in ("msgpack", "pickle"):
            raise ConfigError(f"serializer must be 'msgpack' or 'pickle', got {config.serializer!r}")
        self._pickle = config.serializer == "pickle"
        Submitter.__init__(self, self)
        Service.__init__(self)
        self.config = config
        self.sink_address = ""
        self._state = ClientState(config)
        """All bookkeeping of the tasks (the pure state machine); this class only drives it."""
        self.bad_input = transport.BadInput("client")
        # Task ids are client-chosen (a random base, so ids of different clients rarely collide) and every
        # worker sees them; the client id is the scheduler's only proof of who owns tasks (CANCEL, CLIENT_BYE),
        # so it is a secret unrelated to them.
        self._id_base = int.from_bytes(os.urandom(4), "big") >> 1 << 32
        self._client_id = os.urandom(16)
        self._seq = 0
        self._names: dict[Any, str] = {}
        self._pump_scheduled = False
        self._welcomed = asyncio.Event()
        self._room = asyncio.Event()
        self._status_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._last_heard = time.monotonic()
        self._started = False

    # ---- the state machine's figures, under the names callers and tests use -----------------

    @property
    def epoch(self) -> int | None:
        return self._state.epoch

    @property
    def duplicates(self) -> int:
        """Results dropped: a second result for an id, or one for an id this client does not hold."""
        return self._state.duplicates

    @property
    def resubmitted(self) -> int:
        return self._state.resubmitted

    @property
    def unasked_cancels(self) -> int:
        return self._state.unasked_cancels

    @property
    def _handles(self) -> dict[int, Handle]:
        return self._state.handles

    @property
    def _outbox(self) -> deque[Handle]:
        return self._state.outbox

    @property
    def _in_scheduler(self) -> int:
        return self._state.in_scheduler

    @_in_scheduler.setter
    def _in_scheduler(self, n: int) -> None:
        self._state.in_scheduler = n

    @property
    def _missing_prev(self) -> set[int]:
        return self._state.missing_prev

    @property
    def _missing_now(self) -> set[int]:
        return self._state.missing_now

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> "Client":
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        address = FabricAddress.parse(cfg.address)
        hb_ms = int(cfg.timing.heartbeat_s * 1000)
        self._intake = transport.make_socket(zmq.PUSH, connect=True, linger_ms=500, sndhwm=1000, heartbeat_ms=hb_ms)
        self._intake.setsockopt(zmq.IMMEDIATE, 1)
        self._sink = transport.make_socket(zmq.PULL, connect=False, rcvhwm=100_000, heartbeat_ms=hb_ms)
        curve = Curve(cfg.curve, "client") if cfg.curve is not None else None
        if curve is not None:
            curve.connect_to(self._intake, curve.scheduler_key)
            curve.serve(self._sink, "fabric")
        self.sink_address = self._bind_sink(address)
        if curve is not None:
            self.sink_address = curve.sink_address(self.sink_address)
        self._intake.connect(address.intake)
        self._to_scheduler = transport.Sender(self._intake, limit=1_000_000)
        self._reader = transport.Reader(self._sink, self._on_sink, "sink", self.bad_input)
        self._tasks = [asyncio.create_task(self._reader.run(self._stop)), asyncio.create_task(self._ticker())]
        self._started = True
        self._last_heard = time.monotonic()
        self._hello()
        try:
            await asyncio.wait_for(self._welcomed.wait(), cfg.timeout_s)
        except asyncio.TimeoutError:
            await self.stop()
            raise FabricUnreachable(
                f"no scheduler answered at {cfg.address} within {cfg.timeout_s:g} s; is `zfabric up` or "
                f"`zfabric scheduler` running there (and port {address.port} reachable)?") from None
        return self

    def _bind_sink(self, address: FabricAddress) -> str:
        cfg = self.config
        if cfg.sink_bind:
            if cfg.sink_bind.endswith(":0") or cfg.sink_bind.endswith(":*"):
                bound = self._bind_random(cfg.sink_bind.rsplit(":", 1)[0])
            else:
                self._sink.bind(cfg.sink_bind)
                bound = self._sink.getsockopt_string(zmq.LAST_ENDPOINT)
        elif address.host is None:
            path = os.path.join(tempfile.gettempdir(), f"zfabric-sink-{os.getpid()}-{os.urandom(4).hex()}")
            self._sink.bind(f"ipc://{path}")
            bound = f"ipc://{path}"
        else:
            ip = local_ip_towards(address.host)
            if ":" in ip:
                self._sink.setsockopt(zmq.IPV6, 1)
                ip = f"[{ip}]"
            bound = self._bind_random(f"tcp://{ip}")
        return cfg.sink_advertise or bound

    def _bind_random(self, prefix: str) -> str:
        port = self._sink.bind_to_random_port(prefix, min_port=20000, max_port=60000)
        return f"{prefix}:{port}"

    async def stop(self) -> None:
        """Leave: the scheduler forgets our unfinished tasks, which fail here with FabricError."""
        if not self._started:
            return
        self._started = False
        try:
            self._intake.send(encode(ClientBye(self._client_id, self.sink_address)), zmq.NOBLOCK)
        except zmq.Again:
            pass
        await self._end_tasks()
        self._fail_all(FabricUnreachable("the client was closed before the task finished"))
        transport.close_all([self._intake, self._sink])
        if self.sink_address.startswith("ipc://"):
            try:
                os.unlink(self.sink_address[len("ipc://"):])
            except OSError:
                pass

    async def gather(self, handles: "list[Handle]") -> list[Any]:
        """Values of all `handles`, in order; raises the first error. Cheaper than `asyncio.gather`
        (which wraps every handle in a Task)."""
        remaining = sum(1 for h in handles if not h.done())
        if remaining:
            all_done: asyncio.Future[None] = self._loop.create_future()

            def one_done(_: Handle) -> None:
                nonlocal remaining
                remaining -= 1
                if remaining == 0 and not all_done.done():
                    all_done.set_result(None)
            for h in handles:
                if not h.done():
                    h.add_done_callback(one_done)
            await all_done
        return [h.result() for h in handles]

    def sync(self) -> "SyncClient":
        """A blocking facade on this configuration, running its own event loop in a thread."""
        from .syncclient import SyncClient
        return SyncClient(self.config)

    def options(self, *, priority: int = 0, **options: Any) -> Submitter:
        """Submission options for the tasks submitted through the returned object."""
        return Submitter(self, priority, **options)

    # ---- submitting -----------------------------------------------------------------------

    def _name(self, fn: TaskRef) -> str:
        try:
            name = self._names.get(fn)
        except TypeError:  # unhashable
            name = None
        if name is None:
            name = function_name(fn, self.config.main_functions)
            try:
                self._names[fn] = name
            except TypeError:
                pass
        return name

    def _submit(self, fn: TaskRef, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any],
                placement: Any) -> Handle:
        if not self._started:
            raise FabricUnreachable("the client is not started; use `async with zfabric.Client(...)`")
        name = self._name(fn)
        pickled = self._pickle or options.get("serializer") == "pickle"
        if pickled and "serializer" not in options:
            options = {**options, "serializer": "pickle"}
        try:
            payload = encode_call(name, args, kwargs, options, pickled)
        except Exception:
            raise SubmitError(f"cannot submit {name}: {describe_unencodable(args, kwargs)}") from None
        if len(payload) > MAX_CALL_BYTES:
            raise SubmitError(
                f"cannot submit {name}: its encoded call is {len(payload)} bytes, over the limit of {MAX_CALL_BYTES} "
                f"bytes (the {MAX_FRAME_BYTES}-byte frame limit less {ENVELOPE_HEADROOM} for the envelope); "
                "pass large data by reference (a path or URL) instead")
        self._seq += 1
        handle = Handle(self._id_base + self._seq, self, payload, placement)
        state = self._state
        waiting = state.submit(handle)
        if waiting >= MAX_BATCH_TASKS and state.in_scheduler < self.config.window:
            self._send_waiting()  # a full batch goes now, so the fabric works while the caller is still submitting
        elif not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)
            if waiting == 1:
                self._send_waiting()  # a lone task goes at once; what follows it in this turn is batched
        return handle

    async def _wait_for_room(self) -> None:
        while len(self._state.outbox) >= self.config.max_backlog:
            self._room.clear()
            await self._room.wait()

    def _cancel(self, handle: Handle) -> None:
        if self._state.cancel(handle) and not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        self._send_waiting()

    def _send_waiting(self) -> None:
        """Send cancellations, and waiting tasks while the window has room, many per frame."""
        self._state.send_waiting()
        self._execute()
        if len(self._state.outbox) < self.config.max_backlog:
            self._room.set()

    def _execute(self) -> None:
        """Carry out the state machine's commands, in order."""
        state = self._state
        if not state.commands:
            return
        cid, sink = self._client_id, self.sink_address
        send = self._to_scheduler.send
        for command in state.take():
            if isinstance(command, SendSubmit):
                send(encode(Submit(cid, sink, self.config.results_to, command.flat, tuple(command.frames))))
            elif isinstance(command, SendCancel):
                send(encode(Cancel(cid, sink, command.ids)))
            elif isinstance(command, SendAudit):
                send(encode(Audit(cid, sink, command.ids)))
            elif isinstance(command, SayHello):
                self._hello()

    def _audit(self) -> None:
        """Ask which unfinished tasks the scheduler no longer holds (see `ClientState.missing`)."""
        self._state.audit_due(self.audit_chunk)
        self._execute()

    def _on_missing(self, ids: list[Any]) -> None:
        """A MISSING reply (one chunk of an audit round): tasks missing twice in a row are submitted again."""
        self._state.missing(ids)
        self._execute()

    # ---- receiving ------------------------------------------------------------------------

    def _on_sink(self, batch: list[list[Any]]) -> None:
        self._last_heard = time.monotonic()
        state = self._state
        for _, kind, f in transport.messages(batch, _SINK_KINDS, self.bad_input, "sink"):
            if kind == Kind.RESULT:
                state.results(f.results, f.frames)
            elif kind == Kind.HEARTBEAT:
                state.heard(f[0])
            elif kind == Kind.ACCEPTED:
                state.accepted(f[0], f[1])
            elif kind == Kind.WELCOME:
                state.welcome(f[0])
            elif kind == Kind.REJECTED:
                state.rejected(f[1])
            elif kind == Kind.MISSING:
                self._on_missing(f[1])
            elif kind == Kind.STATUS_REPLY:
                waiters, self._status_waiters = self._status_waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(f[0])
        if state.welcomed:
            self._welcomed.set()
        self._execute()
        if not self._pump_scheduled and state.outbox:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _hello(self) -> None:
        try:
            self._intake.send(encode(ClientHello(self._client_id, self.sink_address, dict(self.bad_input.counts))),
                              zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet; the ticker says hello again

    def _fail_all(self, error: Exception) -> None:
        self._state.fail_all(error)

    async def _ticker(self) -> None:
        timing = self.config.timing
        last_audit = time.monotonic()
        while not self._stop.is_set():
            await asyncio.sleep(timing.heartbeat_s if self._state.welcomed else 0.02)
            self._hello()
            if self._state.welcomed and time.monotonic() - last_audit >= self.config.audit_s:
                last_audit = time.monotonic()
                self._audit()
            if self._to_scheduler.backlog:
                self._to_scheduler.flush()
            silent = time.monotonic() - self._last_heard
            if silent > timing.scheduler_timeout_s and self._state.welcomed:
                log.warning("client: scheduler silent for %.1f s; waiting for it", silent)
                self._state.lost_contact()
                self._welcomed.clear()
            if silent > self.config.timeout_s and self._handles:
                log.error("client: scheduler at %s silent for %.0f s; failing %d tasks", self.config.address,
                          silent, len(self._handles))
                self._fail_all(FabricUnreachable(
                    f"the scheduler at {self.config.address} did not answer for {silent:.0f} s "
                    f"(timeout_s={self.config.timeout_s:g})"))

    # ---- status ---------------------------------------------------------------------------

    async def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The scheduler's counters: workers, queued, running, done, failed, ..."""
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._status_waiters.append(fut)
        self._to_scheduler.send(encode(StatusRequest(self.sink_address)))
        return await asyncio.wait_for(fut, timeout_s)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The fabric's events as they happen: dicts with ``event`` (``submitted``, ``dispatched``, ``done``,
        ``failed``, ``cancelled``, ``redelivered``, ``retried``, ``worker-joined``, ``worker-lost``,
        ``worker-draining``, ``worker-left``; ``lost`` when this follower fell behind), ``t`` and ``task`` or
        ``worker``. Events before the subscription took hold are not seen."""
        from .follow import follow
        async for event in follow(self.config, lambda: self.status(self.config.timeout_s)):
            yield event

    @property
    def pending(self) -> int:
        """Tasks submitted and not finished."""
        return len(self._state.handles)
