"""Regression tests for the worker-side findings of issue 10, on real processes and sockets.

1: cancelling tasks (even before their first step) leaks no worker slot, and leaving is prompt.
5: a task whose sink address is unusable gives its slot back.
7: a result over the frame limit fails at the worker, naming its size and the limit.
16: `zfabric worker` with an address it cannot parse exits with the clean error alone.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import pytest
import zmq

import zfabric
from zfabric import demo_tasks, transport
from zfabric.protocol import Kind, encode, encode_call

from conftest import ROOT, TASKS, async_wait_for, zfabric_cmd

pytestmark = pytest.mark.timeout(60)


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
            intake.send(encode(Kind.SUBMIT, os.urandom(16), "bogus", "", flat))

            async def scheduler_saw_them() -> bool:
                return (await client.status())["submitted"] >= 30
            await async_wait_for(scheduler_saw_them, timeout=10, what="the bogus tasks to arrive")
            assert await client.map(demo_tasks.inc, range(50)) == list(range(1, 51))

            async def all_free() -> bool:
                status = await client.status()
                return status["running"] == 0 and await worker_free(client) == [20]
            await async_wait_for(all_free, timeout=10, what="the worker's 20 slots to come back")
        finally:
            intake.close(linger=0)


@pytest.mark.timeout(90)
async def test_oversize_result_fails_at_the_worker_naming_size_and_limit() -> None:
    async with zfabric.local(workers=1, app=[TASKS], audit_s=60) as client:
        small = [client.submit(demo_tasks.inc, i) for i in range(10)]
        big = client.submit(demo_tasks.sblob, 70_000_000)
        started = time.monotonic()
        with pytest.raises(zfabric.TaskError) as caught:
            await big
        assert time.monotonic() - started < 20
        message = str(caught.value)
        assert "70,000,0" in message and "67,043,328" in message, message
        assert await client.gather(small) == list(range(1, 11))


def test_worker_with_an_unparsable_address_exits_cleanly() -> None:
    proc = subprocess.run(zfabric_cmd("worker", "tcp://nohost", "--app", TASKS), cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "tcp://nohost" in proc.stderr
    assert "Traceback" not in proc.stderr and "AttributeError" not in proc.stderr, proc.stderr
