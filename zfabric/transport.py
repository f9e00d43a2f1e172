"""pyzmq sockets: options, non-blocking drain and send with back-pressure (layer 3).

The rule it keeps: every socket zfabric opens is made here, with every option
set explicitly (LINGER, HWMs, MAXMSGSIZE, HANDSHAKE_IVL, ZMTP heartbeats,
IMMEDIATE, reconnect back-off, ROUTER_MANDATORY). Sockets are plain
(non-asyncio) pyzmq sockets owned by the event-loop thread: readers drain
with NOBLOCK until EAGAIN and only then wait on the socket's FD, so the hot
path never awaits per message.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections import Counter, deque
from typing import Any, Callable, Iterable, Iterator, Sequence, cast

import zmq

from .errors import ProtocolError
from .protocol import MAX_FRAME_BYTES, MAX_FRAMES, Kind, decode
from .security import Curve, check_versions, split_sink

log = logging.getLogger(__name__)

RECV_BATCH = 2000
"""Messages taken from one socket before yielding to the loop."""
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)  # plain ints: the enum operators cost microseconds on every check
_RCVMORE = int(zmq.RCVMORE)  # (and `socket.rcvmore` costs 2.7 µs a message more than this)


_checked = False


def context() -> zmq.Context:
    global _checked
    if not _checked:
        check_versions()
        _checked = True
        raise_fd_limit()
        ctx: zmq.Context = zmq.Context.instance()
        try:  # libzmq allows 1023 sockets by default; a scheduler holds one per client
            import resource
            ctx.set(zmq.MAX_SOCKETS, max(1024, min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)))
        except (ImportError, zmq.ZMQError):
            pass
    return zmq.Context.instance()


def new_routing_id() -> bytes:
    """A random routing id; libzmq reserves ids starting with a zero byte for its own."""
    return b"\x01" + os.urandom(15)


def seed_libc_rand() -> None:
    """Seed the C library's rand(), which libzmq uses, unseeded, for automatic routing ids (libzmq #4633)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.srand(int.from_bytes(os.urandom(4), "little"))
    except OSError:  # not glibc-like; nothing to seed
        log.debug("could not seed libc rand()")


def raise_fd_limit(wanted: int = 65536) -> None:
    """Every client sink costs the scheduler a socket: lift the soft descriptor limit towards the hard one."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def make_socket(kind: int, *, connect: bool, linger_ms: int = 0, sndhwm: int = 100_000, rcvhwm: int = 100_000,
                routing_id: bytes | None = None, heartbeat_ms: int = 1000) -> zmq.Socket:
    sock = context().socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * 3)
    sock.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_ms * 3)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if connect:
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    return sock


def open_push(address: str, curve: Curve | None, *, linger_ms: int, sndhwm: int, heartbeat_ms: int) -> zmq.Socket:
    """A PUSH connected to a sink address (``#curve=KEY`` names the sink's public key)."""
    endpoint, server_key = split_sink(address)
    if (server_key is None) != (curve is None):
        raise zmq.ZMQError(zmq.EINVAL, "sink needs CURVE" if curve is None else
                           "sink address has no CURVE key but CURVE is on")
    sock = make_socket(zmq.PUSH, connect=True, linger_ms=linger_ms, sndhwm=sndhwm, heartbeat_ms=heartbeat_ms)
    try:
        if curve is not None and server_key is not None:
            curve.connect_to(sock, server_key)
        sock.connect(endpoint)
    except zmq.ZMQError:
        sock.close()
        raise
    return sock


def bind_pair(intake: zmq.Socket, router: zmq.Socket, host: str, port: int, attempts: int = 50) -> int:
    """Bind `intake` on PORT and `router` on PORT+1; PORT 0 picks a free pair. Returns PORT."""
    for _ in range(attempts if port == 0 else 1):
        chosen = port or intake.bind_to_random_port(f"tcp://{host}", min_port=20000, max_port=60000)
        if port:
            intake.bind(f"tcp://{host}:{port}")
        try:
            router.bind(f"tcp://{host}:{chosen + 1}")
            return chosen
        except zmq.ZMQError:
            intake.unbind(f"tcp://{host}:{chosen}")
            if port:
                raise
    raise OSError(f"no free pair of ports PORT, PORT+1 found on {host}")


class Reader:
    """Drains one socket from the loop's reader callback and hands batches to `handle`.

    No coroutine and no await per message: when the socket's FD is readable
    the callback receives with NOBLOCK until EAGAIN (or a batch is full, then
    it reschedules itself so other sockets get a turn) and handles the batch
    at once. The FD is edge-triggered and any send on the same socket may
    consume the edge that announced new input: whoever sends on it must call
    `after_send()` afterwards, so the reader looks again if input is waiting.
    """

    def __init__(self, sock: zmq.Socket, handle: Callable[[list[list[Any]]], None], name: str,
                 bad_input: "BadInput | None" = None, routed: bool = False) -> None:
        self.sock = sock
        self._copied = 2 if routed else 1  # routing id and envelope are copied; payload frames are not
        self.handle = handle
        self.name = name
        self.bad_input = bad_input or BadInput(name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False

    def wake(self) -> None:
        """Look at the socket soon, whatever its FD says."""
        if self._loop is not None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._on_readable)

    def after_send(self) -> None:
        """Call after sending on this socket: a send may have consumed the edge announcing input."""
        if not self._scheduled and self._has_input():
            self.wake()

    def _has_input(self) -> bool:
        return not self.sock.closed and bool(cast(int, self.sock.getsockopt(_EVENTS)) & _POLLIN)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve the socket until `stop` is set."""
        self._loop = asyncio.get_running_loop()
        fd = self.sock.FD
        self._loop.add_reader(fd, self._on_readable)
        self.wake()  # input may have arrived before we were watching
        try:
            await stop.wait()
        finally:
            self._loop.remove_reader(fd)
            self._loop = None

    def _on_readable(self) -> None:
        self._scheduled = False
        if self._loop is None or self.sock.closed:
            return
        batch = self._drain()
        if batch:
            try:
                self.handle(batch)
            except Exception:  # a bug, not bad input: keep the process serving, say it loudly
                log.exception("%s: error while handling a batch of %d messages", self.name, len(batch))
        if len(batch) >= RECV_BATCH or self._has_input():
            self.wake()  # more is waiting: continue after the loop's other work

    def _drain(self) -> list[list[Any]]:
        """Messages as lists of frames: the envelope (and routing id) as bytes, payload frames as
        `zmq.Frame`s, received without a copy (the scheduler passes them on as they are)."""
        batch: list[list[Any]] = []
        sock = self.sock
        recv, more, copied = sock.recv, sock.getsockopt, self._copied
        try:
            while len(batch) < RECV_BATCH:
                frames: list[Any] = [recv(zmq.NOBLOCK)]
                count = 1
                while more(_RCVMORE):  # the rest of a message is there once its first frame is
                    if count < MAX_FRAMES:
                        frames.append(recv(copy=count < copied))
                    else:
                        recv()  # over the limit: read to the end of the message, keep nothing
                    count += 1
                if count > MAX_FRAMES:
                    self.bad_input("message with too many frames", self.name, f"{count} (limit {MAX_FRAMES})")
                    continue
                batch.append(frames)
                if len(batch) == 1 and not self._has_input():
                    break  # a lone message, the latency case: learn it without a failing receive
        except zmq.Again:
            pass
        return batch


class Sender:
    """Sends without blocking; holds frames in order when the socket would block, up to `limit` frames
    and `limit_bytes` bytes (beyond that `send` refuses and counts a drop)."""

    def __init__(self, sock: zmq.Socket, limit: int = 1_000_000, limit_bytes: int = 1 << 40) -> None:
        self.sock = sock
        self.backlog: deque[list[Any] | bytes] = deque()
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self.dropped = 0

    def send(self, frames: list[Any] | bytes) -> bool:
        """Queue or send; returns False (and counts a drop) if the backlog is full."""
        if self.backlog:
            return self._hold(frames)
        try:
            self._send_one(frames)
            return True
        except zmq.Again:
            return self._hold(frames)

    @staticmethod
    def _size(frames: list[Any] | bytes) -> int:
        return len(frames) if isinstance(frames, bytes) else sum(len(f) for f in frames)

    def _hold(self, frames: list[Any] | bytes) -> bool:
        size = self._size(frames)
        if len(self.backlog) >= self.limit or self.held_bytes + size > self.limit_bytes:
            self.dropped += 1
            return False
        self.backlog.append(frames)
        self.held_bytes += size
        return True

    def _send_one(self, frames: list[Any] | bytes) -> None:
        if isinstance(frames, bytes):
            self.sock.send(frames, zmq.NOBLOCK, copy=len(frames) < 65536)
        else:  # payload frames go without a copy (pyzmq still copies the small ones: cheaper for them)
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def flush(self) -> int:
        """Send what was held, in order; returns how many frames went out."""
        backlog = self.backlog
        sent = 0
        try:
            while backlog:
                self._send_one(backlog[0])
                self.held_bytes -= self._size(backlog.popleft())
                sent += 1
        except zmq.Again:
            pass
        return sent

    def clear(self) -> int:
        """Drop everything held; returns how many frames were dropped."""
        n = len(self.backlog)
        self.backlog.clear()
        self.held_bytes = 0
        self.dropped += n
        return n


def close_all(sockets: Iterable[zmq.Socket | None]) -> None:
    for sock in sockets:
        if sock is not None and not sock.closed:
            sock.close()


class BadInput:
    """Counts malformed network input per kind and logs the first of each (per peer) once."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.counts: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()

    def __call__(self, what: str, peer: str, detail: str) -> None:
        self.counts[what] += 1
        peer = peer[:64]
        if (what, peer) not in self._logged and len(self._logged) < 10_000:
            self._logged.add((what, peer))
            log.warning("%s: dropped %s from %s: %s (further ones are only counted)",
                        self.component, what, peer or "an unknown peer", detail)




def messages(batch: list[list[Any]], expect: Sequence[Kind], bad_input: BadInput, name: str,
             routed: bool = False) -> Iterator[tuple[bytes, Kind, Any]]:
    """The valid messages of a batch as (peer routing id or b"", kind, fields); the rest counted as bad input.

    A message is an envelope frame and its payload frames, after a routing id with `routed` (a ROUTER).
    """
    first = 1 if routed else 0
    for frames in batch:
        peer = frames[0] if routed and frames else b""
        if len(frames) <= first:
            bad_input(f"bad {name} envelope", peer.hex(), f"{len(frames)} frames, expected more than {first}")
            continue
        single = len(frames) == first + 1
        try:
            kind, fields = decode(frames[first] if single else frames[first:], expect=expect)
        except ProtocolError as exc:
            bad_input(f"bad {name} message" if single else f"bad {name} envelope", peer.hex(), str(exc))
            continue
        yield peer, kind, fields
