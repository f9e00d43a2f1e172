"""The scheduler process: an asyncio driver around `SchedulerState` (layer 4).

The rule it keeps: no scheduling decisions here. It drains the intake PULL
and the worker ROUTER, feeds each decoded message to the state machine,
and sends what the state machine put in its outbox: to workers over the
ROUTER (ROUTER_MANDATORY; EAGAIN holds, EHOSTUNREACH means the worker is
gone), to clients over one PUSH per client sink.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any

import zmq

from . import events, transport
from .config import FabricAddress, SchedulerConfig
from .errors import ConfigError
from .protocol import Kind, StatusReply, Wire, encode
from .scheduling import SchedulerState
from .security import Curve
from .service import Service

log = logging.getLogger(__name__)

_INTAKE_KINDS = (Kind.CLIENT_HELLO, Kind.SUBMIT, Kind.CANCEL, Kind.CLIENT_BYE, Kind.STATUS_REQUEST, Kind.AUDIT)
_WORKER_KINDS = (Kind.WORKER_HELLO, Kind.DONE, Kind.WORKER_HEARTBEAT, Kind.DRAIN, Kind.WORKER_BYE)
TICK_S = 0.1
STATUS_SOCKETS = 16
"""Sockets kept for status replies to addresses that are not a client's sink."""
EVENTS_HWM = 50
"""EVENTS messages queued per follower (about 5 s of them); a slower one loses the rest, and is told how
many records it lost."""
EVENTS_SNDBUF = 256 * 1024


class Scheduler(Service):
    """A scheduler: `async with Scheduler(SchedulerConfig(bind=...)) as s: await s.wait_closed()`."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        super().__init__()
        self.config = config or SchedulerConfig()
        self.state: SchedulerState | None = None
        self.address = ""
        self.bad_input = transport.BadInput("scheduler")
        self._sinks: dict[str, transport.Sender] = {}
        self._worker_backlog: dict[bytes, deque[Wire]] = {}
        self._status_socks: dict[str, zmq.Socket] = {}
        self._started = time.monotonic()
        self.dropped_to_clients = 0
        self.events_address = ""
        self._topics: set[bytes] = set()  # subscriptions to the event stream (b"": everything)
        self._event_seq = 0
        self.metrics: Any = None  # a metrics.MetricsServer when `metrics_port` is set
        self._rate_samples: deque[tuple[float, int, int]] = deque(maxlen=int(5 / TICK_S))  # the last 5 s

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> "Scheduler":
        cfg = self.config
        address = FabricAddress.parse(cfg.bind)
        transport.seed_libc_rand()
        hb_ms = int(cfg.timing.heartbeat_s * 1000)
        self._intake = transport.make_socket(zmq.PULL, connect=False, rcvhwm=10_000, heartbeat_ms=hb_ms)
        self._router = transport.make_socket(zmq.ROUTER, connect=False, sndhwm=10_000, rcvhwm=100_000,
                                             heartbeat_ms=hb_ms)
        self._curve = Curve(cfg.curve, "scheduler") if cfg.curve is not None else None
        if self._curve is not None:
            self._curve.serve(self._intake, "clients")
            self._curve.serve(self._router, "workers")
        try:
            if address.host is None:
                self._intake.bind(address.intake)
                self._router.bind(address.workers)
                self.address = address.intake
            else:
                host = f"[{address.host}]" if ":" in address.host else address.host
                if ":" in address.host:
                    self._intake.setsockopt(zmq.IPV6, 1)
                    self._router.setsockopt(zmq.IPV6, 1)
                port = transport.bind_pair(self._intake, self._router, host, address.port or 0)
                self.address = f"tcp://{host}:{port}"
        except (zmq.ZMQError, OSError) as exc:
            raise ConfigError(f"cannot listen on {address.intake} and {address.workers}: {exc} "
                              "(is another scheduler running there? pick another --bind port)") from None
        self._xpub = transport.make_socket(zmq.XPUB, connect=False, sndhwm=EVENTS_HWM, rcvhwm=1000,
                                           heartbeat_ms=hb_ms)
        self._xpub.setsockopt(zmq.SNDBUF, EVENTS_SNDBUF)  # a follower that does not read costs little copying
        if self._curve is not None:
            self._curve.serve(self._xpub, "clients")
        if address.host is None:
            self.events_address = f"{address.intake}.events"
            self._xpub.bind(self.events_address)
        else:
            host = self.address.rsplit(":", 1)[0]
            self.events_address = f"{host}:{self._xpub.bind_to_random_port(host)}"
        epoch = int.from_bytes(os.urandom(6), "big")
        self.state = SchedulerState(cfg, epoch)
        if cfg.metrics_port is not None:
            from .histogram import Histogram
            from .metrics import MetricsServer
            host = address.host or "127.0.0.1"
            self.metrics = MetricsServer(host.strip("[]"), cfg.metrics_port)
            self.state.queue_wait, self.state.round_trip = Histogram(), Histogram()
        readers = [transport.Reader(self._intake, self._on_intake, "intake", self.bad_input),
                   transport.Reader(self._router, self._on_router, "workers", self.bad_input, routed=True),
                   transport.Reader(self._xpub, self._on_subscription, "event followers", self.bad_input)]
        self._readers = readers
        self._tasks = [asyncio.create_task(r.run(self._stop)) for r in readers]
        self._tasks.append(asyncio.create_task(self._ticker()))
        log.info("scheduler epoch %x listening on %s (workers on port +1)", epoch, self.address)
        return self

    async def stop(self) -> None:
        await self._end_tasks()
        if self.metrics is not None:
            self.metrics.close()
        transport.close_all([getattr(self, "_intake", None), getattr(self, "_router", None),
                             getattr(self, "_xpub", None),
                             *(s.sock for s in self._sinks.values()), *self._status_socks.values()])
        self._status_socks.clear()
        self._sinks.clear()

    # ---- input ----------------------------------------------------------------------------

    def _on_intake(self, batch: list[list[Any]]) -> None:
        state = self.state
        assert state is not None
        now = time.monotonic()
        for _, kind, f in transport.messages(batch, _INTAKE_KINDS, self.bad_input, "intake"):
            if kind == Kind.SUBMIT:
                if state.submit(f.client_id, f.sink, f.results_to, f.tasks, now, f.frames):
                    self.bad_input("malformed task entry", f[0].hex(),
                                   "not [id, priority or [priority, tags, resources], payload]")
                state.dispatch()  # each batch moves on at once: workers start while more arrive
                self._flush_outbox()
            elif kind == Kind.CLIENT_HELLO:
                state.client_hello(f.client_id, f.sink, now, f.bad_input)
            elif kind == Kind.CANCEL:
                state.cancel(f[0], f[2], now)
            elif kind == Kind.CLIENT_BYE:
                state.client_bye(f[0], now)
            elif kind == Kind.STATUS_REQUEST:
                self._reply_status(f[0])
            elif kind == Kind.AUDIT:
                state.audit(f[0], f[1], f[2], now)
        state.dispatch()
        self._flush_outbox()

    def _on_router(self, batch: list[list[Any]]) -> None:
        state = self.state
        assert state is not None
        now = time.monotonic()
        for wid, kind, f in transport.messages(batch, _WORKER_KINDS, self.bad_input, "worker", routed=True):
            if kind == Kind.DONE:
                state.worker_done(wid, f[0], f[1], f[2], f[3], f[4], f[5], now, f.errors)
            elif kind == Kind.WORKER_HEARTBEAT:
                state.worker_heartbeat(wid, f[0], f[1], now, f.bad_input)
            elif kind == Kind.WORKER_HELLO:
                problem = state.worker_hello(wid, f.name, f.session, f.free, f.running, f.pid, f.host, now,
                                             f.tags, f.resources)
                if problem:
                    self.bad_input("worker tags or resources", wid.hex(), problem)
            elif kind == Kind.DRAIN:
                state.worker_drain(wid, f[0], f[1], now)
            elif kind == Kind.WORKER_BYE:
                state.worker_bye(wid, now)
        self._flush_outbox()

    def _on_subscription(self, batch: list[list[Any]]) -> None:
        """XPUB subscribe (``\x01``) and unsubscribe (``\x00``: the last follower went): the state machine
        records events only while a follower is there. Other topics are refused: counting them would let a
        stranger's unsubscriptions switch recording off under a real follower."""
        state = self.state
        assert state is not None
        for frames in batch:
            frame = frames[0] if len(frames) == 1 else None
            if frame == b"\x01":
                self._topics.add(b"")
            elif frame == b"\x00":
                self._topics.discard(b"")
            else:  # the stream has no topics: a follower subscribes to everything (b"") or to nothing
                self.bad_input("bad event subscription", "", f"{len(frames)} frames, not a subscription to b''")
        if self._topics and state.events is None:
            state.events = []
            log.info("an event follower subscribed; recording events")
        elif not self._topics and state.events is not None:
            state.events = None
            log.info("no event follower left; not recording events")

    # ---- output ---------------------------------------------------------------------------

    def _publish_events(self) -> None:
        state = self.state
        assert state is not None
        records, state.events = state.events or [], []
        now = time.time()
        for message in events.messages(self._event_seq, now, records):
            try:
                self._xpub.send(message, zmq.NOBLOCK)  # over a follower's HWM libzmq drops: never blocks
            except zmq.ZMQError as exc:
                self.bad_input("event publication", "", str(exc))
        self._event_seq += events.count_all(records)
        self._readers[2].after_send()

    def _flush_outbox(self) -> None:
        state = self.state
        assert state is not None
        if state.events and len(state.events) >= events.MAX_RECORDS:
            self._publish_events()  # else the ticker publishes: fewer, fuller messages
        if not state.outbox:
            return
        while state.outbox:
            outbox, state.outbox = state.outbox, []
            outbox.sort(key=lambda out: out[0] != "worker")  # dispatches first: they are on the latency path
            for where, dest, frame in outbox:
                if where == "worker":
                    self._send_worker(dest, frame)
                elif where == "client":
                    self._send_client(dest, frame)
                else:
                    sender = self._sinks.pop(dest, None)
                    if sender is not None:
                        sender.sock.close()
        self._readers[1].after_send()

    def _send_worker(self, wid: bytes, frame: Wire) -> None:
        backlog = self._worker_backlog.get(wid)
        if backlog is not None:
            backlog.append(frame)
            return
        try:
            self._router.send_multipart([wid, frame] if type(frame) is bytes else [wid, *frame], zmq.NOBLOCK,
                                        copy=False)
        except zmq.Again:
            self._worker_backlog[wid] = deque([frame])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._unreachable(wid)

    def _unreachable(self, wid: bytes) -> None:
        self._worker_backlog.pop(wid, None)
        if self.state is not None:
            self.state.worker_lost(wid, "unreachable (EHOSTUNREACH)")

    def _reply_status(self, reply_to: str) -> None:
        """Answer on the requester's sink. Anyone may ask, so what they can make us open is bounded: a
        client's own sink is reused, other addresses share `STATUS_SOCKETS` sockets (the oldest is closed,
        at once, to make room), so a flood of requests naming dead addresses costs no more descriptors."""
        sender = self._sinks.get(reply_to)
        if sender is not None:
            sender.send(encode(StatusReply(self.status())))
            return
        sock = self._status_socks.pop(reply_to, None)
        if sock is None:
            while len(self._status_socks) >= STATUS_SOCKETS:
                oldest = next(iter(self._status_socks))
                self._status_socks.pop(oldest).close(linger=0)
            try:
                sock = transport.open_push(reply_to, self._curve, linger_ms=0, sndhwm=10, heartbeat_ms=1000)
            except zmq.ZMQError as exc:
                self.bad_input("status request", reply_to, str(exc))
                return
        self._status_socks[reply_to] = sock  # most recently used last
        try:
            sock.send(encode(StatusReply(self.status())), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.bad_input("status request", reply_to, str(exc))

    def _retry_worker_backlogs(self) -> None:
        for wid in list(self._worker_backlog):
            backlog = self._worker_backlog[wid]
            try:
                while backlog:
                    frame = backlog[0]
                    self._router.send_multipart([wid, frame] if type(frame) is bytes else [wid, *frame],
                                                zmq.NOBLOCK, copy=False)
                    backlog.popleft()
                del self._worker_backlog[wid]
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self._unreachable(wid)

    def _send_client(self, sink: str, frame: Wire) -> None:
        sender = self._sinks.get(sink)
        if sender is None:
            try:
                sock = transport.open_push(sink, self._curve, linger_ms=0, sndhwm=10_000,
                                           heartbeat_ms=int(self.config.timing.heartbeat_s * 1000))
            except zmq.ZMQError as exc:
                self.bad_input("bad sink address", sink, str(exc))
                return
            sender = self._sinks[sink] = transport.Sender(sock, limit=10_000)
        if not sender.send(frame):
            self.dropped_to_clients += 1

    async def _ticker(self) -> None:
        state = self.state
        assert state is not None
        while not self._stop.is_set():
            state.tick(time.monotonic())
            if state.events:
                self._publish_events()
            self._rate_samples.append((time.monotonic(), state.counters.done, state.counters.submitted))
            if self.metrics is not None and len(self._rate_samples) % 3 == 0:
                from .metrics import snapshot
                self.metrics.snapshot = snapshot(self.status(), state.queue_wait, state.round_trip)
            self._flush_outbox()
            self._retry_worker_backlogs()
            for sender in self._sinks.values():
                if sender.backlog:
                    sender.flush()
            for reader in self._readers:
                reader.wake()
            await asyncio.sleep(TICK_S)

    def status(self) -> dict[str, Any]:
        assert self.state is not None
        status = self.state.status()
        status["address"] = self.address
        status["uptime_s"] = round(time.monotonic() - self._started, 3)
        status["bad_input"] = dict(self.bad_input.counts)
        status["dropped_to_clients"] = self.dropped_to_clients
        status["events"] = self.events_address
        status["events_followed"] = bool(self._topics)
        wall = time.time() - time.monotonic()
        status["recent_failures"] = [{**f, "t": round(f["t"] + wall, 3)} for f in status["recent_failures"]]
        if len(self._rate_samples) >= 2:
            (t0, done0, sub0), (t1, done1, sub1) = self._rate_samples[0], self._rate_samples[-1]
            status["rate_per_s"] = round((done1 - done0) / max(t1 - t0, 1e-9), 1)
            status["submit_rate_per_s"] = round((sub1 - sub0) / max(t1 - t0, 1e-9), 1)
        return status
