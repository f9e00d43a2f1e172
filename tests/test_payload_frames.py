"""Wire v2: payloads of 64 KiB or more travel in frames of their own, passed on by the scheduler uncopied."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import zmq

import zfabric
from zfabric import transport
from zfabric.config import FabricAddress, SchedulerConfig
from zfabric.protocol import (MAX_PAYLOAD_FRAMES, PAYLOAD_FRAME_BYTES, Kind, decode, encode_call, encode_fields,
                              payload_of)
from zfabric.scheduling import SchedulerState

from conftest import TASKS, Fabric, async_wait_for, start_fabric

pytestmark = pytest.mark.timeout(60)
CID = b"client-secret-a!"
SINK = "tcp://127.0.0.1:9001"


def _dispatched(state: SchedulerState) -> list[tuple[list[Any], tuple[Any, ...]]]:
    """(flat task entries, payload frames) of each DISPATCH in the outbox, decoded as a worker would."""
    out = []
    for where, _, wire in state.outbox:
        if where == "worker":
            kind, message = decode(wire)
            if kind == Kind.DISPATCH:
                out += [(group[1], message.frames) for group in message.groups]
    state.outbox.clear()
    return out


def test_the_scheduler_passes_payload_frames_on_as_they_came() -> None:
    state = SchedulerState(SchedulerConfig(), 7)
    state.worker_hello(b"w1", "w1", 1, 10_000, [], 1, "h", 0.0)
    big = [zmq.Frame(bytes([i]) * PAYLOAD_FRAME_BYTES) for i in range(3)]
    small = b"\x01" * 100
    state.submit(CID, SINK, "", [1, 0, 1, 2, 0, small, 3, 0, 2, 4, 0, 3], 0.0, tuple(big))
    state.dispatch()
    entries = _dispatched(state)
    got = {}
    for flat, frames in entries:
        used: set[int] = set()
        got.update({flat[i]: payload_of(flat[i + 2], frames, used) for i in range(0, len(flat), 3)})
    assert got[1] is big[0] and got[3] is big[1] and got[4] is big[2]  # the very objects: no copy was made
    assert got[2] == small


def test_a_dispatch_never_carries_more_frames_than_a_worker_accepts() -> None:
    """A client may put small payloads in frames too (the scheduler keeps them as they came): a DISPATCH
    closes at `MAX_PAYLOAD_FRAMES` frames, so the worker can always decode it."""
    state = SchedulerState(SchedulerConfig(), 7)
    state.worker_hello(b"w1", "w1", 1, 10_000, [], 1, "h", 0.0)
    for batch in range(4):
        frames = tuple(zmq.Frame(b"x") for _ in range(MAX_PAYLOAD_FRAMES))
        flat: list[Any] = []
        for k in range(MAX_PAYLOAD_FRAMES):
            flat += (batch * 1000 + k + 1, 0, k + 1)
        assert state.submit(CID, SINK, "", flat, 0.0, frames) == 0
    state.dispatch()
    entries = _dispatched(state)  # decode() refuses a message over the limit: this would raise
    assert sum(len(flat) // 3 for flat, _ in entries) == 4 * MAX_PAYLOAD_FRAMES
    assert all(len(frames) <= MAX_PAYLOAD_FRAMES for _, frames in entries)


def test_an_entry_naming_a_frame_that_is_not_there_is_malformed() -> None:
    state = SchedulerState(SchedulerConfig(), 7)
    assert state.submit(CID, SINK, "", [1, 0, 2, 2, 0, 0, 3, 0, -1, 4, 0, 1], 0.0, (b"only one",)) == 3
    assert set(state.tasks) == {4}


def test_a_frame_named_by_two_entries_is_taken_once() -> None:
    """One 32 MB frame named by 50,000 entries would have the fabric carry 50,000 copies of it."""
    state = SchedulerState(SchedulerConfig(), 7)
    flat: list[Any] = []
    for task_id in range(1, 1001):
        flat += (task_id, 0, 1)
    assert state.submit(CID, SINK, "", flat, 0.0, (zmq.Frame(b"x" * PAYLOAD_FRAME_BYTES),)) == 999
    assert set(state.tasks) == {1}


@pytest.fixture(scope="module")
def fabric() -> Fabric:
    fabric = start_fabric(workers=2)
    yield fabric
    fabric.stop()


async def test_large_and_small_payloads_in_one_batch_arrive_intact(fabric: Fabric) -> None:
    blobs = [bytes([i % 251]) * size for i, size in enumerate([10, PAYLOAD_FRAME_BYTES - 100, PAYLOAD_FRAME_BYTES,
                                                               PAYLOAD_FRAME_BYTES + 1, 3_000_000, 50, 1 << 20])]
    async with zfabric.Client(fabric.address) as client:
        sizes = await client.map(f"{TASKS}:size", blobs)
        echoed = await client.map(f"{TASKS}:echo", blobs)
    assert sizes == [len(b) for b in blobs]
    assert [hashlib.sha256(e).digest() for e in echoed] == [hashlib.sha256(b).digest() for b in blobs]  # results of 64 KiB and more come back in frames of their own too


async def test_frames_on_a_message_that_carries_none_are_dropped_and_counted(fabric: Fabric) -> None:
    push = transport.make_socket(zmq.PUSH, connect=True)
    push.connect(FabricAddress.parse(fabric.address).intake)
    try:
        async with zfabric.Client(fabric.address) as client:
            before = (await client.status())["bad_input"]
            push.send_multipart(encode_fields(Kind.CLIENT_HELLO, CID, SINK, frames=[b"stowaway"]))
            push.send_multipart(encode_fields(Kind.SUBMIT, CID, SINK, "", [77, 0, 5],
                                              frames=[encode_call(f"{TASKS}:inc", [1], {}, {})]))

            async def counted() -> bool:
                bad = (await client.status())["bad_input"]
                return all(bad.get(k, 0) > before.get(k, 0) for k in ("bad intake envelope", "malformed task entry"))
            await async_wait_for(counted, timeout=10, what="the stray frame and the bad entry counted")
            assert await client.submit(f"{TASKS}:inc", 1) == 2  # and the scheduler serves on
    finally:
        push.close(linger=0)
