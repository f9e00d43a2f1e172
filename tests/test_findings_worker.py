"""Regression tests for the worker-side findings of issue 10, on real processes and sockets.

1: cancelling tasks (even before their first step) leaks no worker slot, and leaving is prompt.
5: a task whose sink address is unusable gives its slot back.
7: a result over the frame limit fails at the worker, naming its size and the limit, promptly; batched
   RESULT frames stay under the limit; an error result always fits.
16: `zfabric worker` with an address it cannot parse exits with the clean error alone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Any

import pytest
import zmq

import zfabric
from zfabric import demo_tasks, transport
from zfabric.config import WorkerConfig
from zfabric.execution import error_entry
from zfabric.protocol import MAX_BATCH_TASKS, MAX_FRAME_BYTES, Kind, Status, decode, decode_error, encode_call, encode_fields, payload_of
from zfabric.results import ResultRouter

from conftest import ROOT, TASKS, async_wait_for, zfabric_cmd

pytestmark = pytest.mark.timeout(60)

MAX_RESULT_BYTES = MAX_FRAME_BYTES - 64 * 1024  # the largest result a worker sends (room for the envelope)


async def worker_free(client: zfabric.Client) -> list[int]:
    return [w["free"] for w in (await client.status())["workers"]]


async def test_cancels_leak_no_slots_and_leaving_is_prompt() -> None:
    fabric = zfabric.local(workers=1, app=[TASKS], concurrency=1000)
    async with fabric as client:
        for i in range(300):
            assert await client.submit(demo_tasks.add, i, 1) == i + 1
            client.submit(demo_tasks.asleep, 0.2).cancel()  # often cancelled before its first step

        async def all_free() -> bool:
            return await worker_free(client) == [1000]
        await async_wait_for(all_free, timeout=15, what="every slot to come back after 300 cancels")
        for _ in range(5):
            client.submit(demo_tasks.asleep, 30).cancel()
        started = time.monotonic()
    assert time.monotonic() - started < 5.0, "leaving waited for cancelled tasks"


async def test_unusable_sink_gives_the_slot_back() -> None:
    async with zfabric.local(workers=1, app=[TASKS], concurrency=20, host="127.0.0.1") as client:
        intake = transport.make_socket(zmq.PUSH, connect=True)
        try:
            intake.connect(client.config.address)
            flat: list[Any] = []
            for i in range(30):
                flat += (7_000_000 + i, 0, encode_call(f"{TASKS}:inc", [i], {}, {}))
            intake.send(encode_fields(Kind.SUBMIT, os.urandom(16), "bogus", "", flat))

            async def scheduler_saw_them() -> bool:
                return (await client.status())["submitted"] >= 30
            await async_wait_for(scheduler_saw_them, timeout=10, what="the bogus tasks to arrive")
            # (on the old worker the bogus tasks kept every slot: these never ran)
            assert await asyncio.wait_for(client.map(demo_tasks.inc, range(50)), 15) == list(range(1, 51))

            async def all_free() -> bool:
                status = await client.status()
                return status["running"] == 0 and await worker_free(client) == [20]
            await async_wait_for(all_free, timeout=10, what="the worker's 20 slots to come back")
        finally:
            intake.close(linger=0)


@pytest.mark.timeout(60)
async def test_oversize_result_fails_at_the_worker_naming_size_and_limit() -> None:
    async with zfabric.local(workers=1, app=[TASKS]) as client:  # the default audit: every 2 s
        small = [client.submit(demo_tasks.inc, i) for i in range(10)]
        assert await client.gather(small[:1]) == [1]  # the worker is up: time only the big result
        started = time.monotonic()
        big = client.submit(demo_tasks.sblob, 70_000_000)
        with pytest.raises(zfabric.TaskError) as caught:
            await asyncio.wait_for(big, 15)  # (the old worker dropped the sink's link: it never came)
        elapsed = time.monotonic() - started
        message = str(caught.value)
        assert "70,000,0" in message and "67,108,864-byte frame limit" in message, message
        assert elapsed < 3.5, f"the oversize result took {elapsed:.1f} s to fail: it ran again after an audit"
        assert await client.gather(small) == list(range(1, 11))
        more = [client.submit(demo_tasks.inc, i) for i in range(10)]
        assert await client.gather(more) == list(range(1, 11))


async def test_result_frames_stay_under_the_frame_limit_and_batch_size() -> None:
    """Results batched for one sink never make a frame over the limit (nor over MAX_BATCH_TASKS results)."""
    sink = transport.make_socket(zmq.PULL, connect=False)  # MAXMSGSIZE as every real sink: over it drops the link
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    dropped: list[int] = []
    router = ResultRouter(WorkerConfig(address="tcp://127.0.0.1:1"), None, 1000, transport.BadInput("test"),
                          dropped.append)
    try:
        address = f"tcp://127.0.0.1:{port}"
        expected: dict[int, int] = {}
        for i in range(2500):  # tiny ones, many: several frames
            assert router.add(address, i, Status.OK, b"x")
            expected[i] = 1
        router.flush()
        assert router.add(address, 9000, Status.OK, b"s" * 1_000_000)  # under MAX_BATCH_BYTES: it waits...
        assert router.add(address, 9001, Status.OK, b"b" * (MAX_RESULT_BYTES - 100))  # ...but both won't fit
        expected[9000], expected[9001] = 1_000_000, MAX_RESULT_BYTES - 100
        assert router.add(address, 9002, Status.OK, b"o" * (MAX_FRAME_BYTES + 10))  # never sent as it is
        router.flush()
        got: dict[int, tuple[int, int]] = {}
        deadline = time.monotonic() + 20
        while len(got) < len(expected) + 1:
            assert time.monotonic() < deadline, f"only {len(got)} results arrived (an oversize frame drops the link)"
            router.retry()
            if not sink.poll(100):  # (a wait on the socket with a deadline, not a sleep)
                continue
            frames = sink.recv_multipart()
            assert all(len(frame) <= MAX_FRAME_BYTES for frame in frames)
            _, result = decode(frames if len(frames) > 1 else frames[0], expect=[Kind.RESULT])
            flat, used = result.results, set()
            assert len(flat) <= 3 * MAX_BATCH_TASKS
            for j in range(0, len(flat), 3):
                got[flat[j]] = (flat[j + 1], len(payload_of(flat[j + 2], result.frames, used)))
        assert {k: n for k, (status, n) in got.items() if k != 9002} == expected
        assert all(status == Status.OK for k, (status, _) in got.items() if k != 9002)
        assert got[9002][0] == Status.ERROR and dropped == []
    finally:
        router.close()
        sink.close(linger=0)


def test_an_error_result_always_fits_a_frame() -> None:
    """A failure's payload is bounded and encodable whatever the task raised."""
    class BadStr(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    for exc in (ValueError("m" * (MAX_FRAME_BYTES + 1)), ValueError("\udcff lone surrogate"), BadStr()):
        try:
            raise exc
        except Exception as caught:
            status, data = error_entry(caught)
        assert status == Status.ERROR and len(data) < 1024 * 1024
        name, message, _ = decode_error(data)
        assert name.endswith(type(exc).__qualname__) and message  # non-builtins are named module.QualName


def test_worker_with_an_unparsable_address_exits_cleanly() -> None:
    proc = subprocess.run(zfabric_cmd("worker", "tcp://nohost", "--app", TASKS), cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "tcp://nohost" in proc.stderr
    assert "Traceback" not in proc.stderr and "AttributeError" not in proc.stderr, proc.stderr
