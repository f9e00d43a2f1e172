"""Following the event stream from outside the scheduler (layer 4: sockets; imports events, transport).

The scheduler's status names its event address; `follow` subscribes there and yields one JSON-ready
object a task and event, plus ``{"event": "lost", "count": N}`` where it fell behind.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

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


async def follow(config: ClientConfig, status: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Events of the fabric whose ``status`` this is, as they happen (until the caller stops iterating)."""
    address = status.get("events")
    if not isinstance(address, str) or not address:
        raise FabricError("this scheduler publishes no event stream (it predates zfabric's events)")
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
            for frames in await batches.get():
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
