"""Following the event stream from outside the scheduler (layer 4: sockets; imports events, transport).

The scheduler's status names its event address; `follow` subscribes there and yields one JSON-ready
object a task and event, plus ``{"event": "lost", "count": N}`` where it fell behind.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import zmq

from . import transport
from .config import ClientConfig, FabricAddress
from .errors import FabricError, ProtocolError
from .events import Follower
from .protocol import Kind, decode
from .security import Curve

MAX_QUEUED_BATCHES = 100
"""Batches of EVENTS read but not yet taken by a slow caller; more are dropped (and reported as lost)."""


def reachable(events_address: str, fabric_address: str) -> str:
    """The events address as this follower can reach it: a wildcard host becomes the fabric's host."""
    if not events_address.startswith("tcp://"):
        return events_address
    host, _, port = events_address[len("tcp://"):].rpartition(":")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        fabric = FabricAddress.parse(fabric_address)
        host = fabric.host if fabric.host and ":" not in fabric.host else f"[{fabric.host}]"
    return f"tcp://{host}:{port}"


def _events_address(status: dict[str, Any]) -> str:
    address = status.get("events")
    if not isinstance(address, str) or not address:
        raise FabricError("this scheduler publishes no event stream (it predates zfabric's events)")
    return address


async def follow(config: ClientConfig, status_of: Callable[[], Awaitable[dict[str, Any]]]
                 ) -> AsyncIterator[dict[str, Any]]:
    """Events of the fabric whose status `status_of` gives, as they happen (until the caller stops). After
    `RECHECK_S` of silence it asks for the status again: a restarted scheduler publishes elsewhere (tcp)
    or numbers from 0 again; either way the follower goes on, with a ``scheduler-restarted`` event."""
    status = await status_of()
    address, epoch = _events_address(status), status.get("epoch")
    while True:
        async for event in _follow_one(config, address):
            if event is RECHECK:
                try:
                    status = await status_of()
                except (asyncio.TimeoutError, FabricError):
                    continue
                if status.get("epoch") != epoch:
                    address, epoch = _events_address(status), status.get("epoch")
                    yield {"event": RESTARTED, "t": time.time()}
                    break
            else:
                yield event


RECHECK: dict[str, Any] = {}
"""Yielded by `_follow_one` after a silence (never to the caller)."""
RESTARTED = "scheduler-restarted"
RECHECK_S = 5.0


async def _follow_one(config: ClientConfig, address: str) -> AsyncIterator[dict[str, Any]]:
    sock = transport.make_socket(zmq.SUB, connect=True, rcvhwm=10_000,
                                 heartbeat_ms=int(config.timing.heartbeat_s * 1000))
    if config.curve is not None:
        curve = Curve(config.curve, "client")
        curve.connect_to(sock, curve.scheduler_key)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(reachable(address, config.address))
    batches: asyncio.Queue[list[list[Any]]] = asyncio.Queue()
    bad_input = transport.BadInput("events")

    def take(batch: list[list[Any]]) -> None:
        if batches.qsize() < MAX_QUEUED_BATCHES:  # else dropped: the numbering tells the caller how much
            batches.put_nowait(batch)

    reader = transport.Reader(sock, take, "events", bad_input)
    stop = asyncio.Event()
    reading = asyncio.create_task(reader.run(stop))
    follower = Follower()
    try:
        while True:
            try:
                batch = await asyncio.wait_for(batches.get(), RECHECK_S)
            except asyncio.TimeoutError:
                yield RECHECK
                continue
            for frames in batch:
                try:
                    _, message = decode(frames if len(frames) > 1 else frames[0], expect=(Kind.EVENTS,))
                except ProtocolError as exc:
                    bad_input("bad EVENTS message", address, str(exc))
                    continue
                for event in follower.feed(message):
                    yield event
    finally:
        stop.set()
        await reading
        sock.close(linger=0)
