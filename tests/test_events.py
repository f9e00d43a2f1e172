"""Seeing the fabric (SPEC §9): the event stream, `zfabric events`, and `zfabric status --json`.

Real processes on real sockets: a `zfabric up` fabric, followers as `zfabric events` processes or raw SUB
sockets, and workers started and SIGKILLed beside it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from typing import Any, Iterator

import pytest
import zmq

import zfabric
from zfabric.events import Follower
from zfabric.protocol import Events, Kind, decode, encode

from conftest import ROOT, TASKS, Fabric, async_wait_for, read_line_matching, start_fabric, zfabric_cmd

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def fab() -> Iterator[Fabric]:
    fabric = start_fabric(workers=2)
    yield fabric
    fabric.stop()


async def _followed(client: zfabric.Client, followed: bool = True) -> None:
    async def check() -> bool:
        return (await client.status())["events_followed"] is followed
    await async_wait_for(check, 15, f"the scheduler to see {'a' if followed else 'no'} follower")


def _subscriber(ctx: zmq.Context, address: str, topic: bytes, **options: int) -> zmq.Socket:
    """A raw SUB socket on the event stream (that reads only when the test says)."""
    sub = ctx.socket(zmq.SUB)
    for name, value in options.items():
        sub.setsockopt(getattr(zmq, name), value)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(address)
    return sub


async def _follow(client: zfabric.Client) -> tuple[list[dict[str, Any]], asyncio.Task[None]]:
    """Collect `client.events()` in the background, once the scheduler sees the subscription."""
    seen: list[dict[str, Any]] = []

    async def follow() -> None:
        async for event in client.events():
            seen.append(event)
    following = asyncio.create_task(follow())
    await _followed(client)
    return seen, following


async def test_zfabric_events_prints_a_json_line_per_task_event(fab: Fabric) -> None:
    proc = subprocess.Popen(zfabric_cmd("events", fab.address, "--count", "300"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        async with zfabric.Client(fab.address) as client:
            await _followed(client)
            values = await client.map(f"{TASKS}:inc", range(100))
            assert values == list(range(1, 101))
            out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 300, "--count 300 printed another number of lines"
    kinds = Counter(line["event"] for line in lines)
    assert kinds == {"submitted": 100, "dispatched": 100, "done": 100}, kinds
    for line in lines:
        assert isinstance(line["t"], float) and abs(line["t"] - time.time()) < 60
        assert isinstance(line["task"], int)
        assert ("client" if line["event"] == "submitted" else "worker") in line
    per_task: dict[int, list[str]] = {}
    for line in lines:
        per_task.setdefault(line["task"], []).append(line["event"])
    assert all(events == ["submitted", "dispatched", "done"] for events in per_task.values()), \
        "a task's events came out of order"


async def test_failures_carry_their_error_in_events_and_in_status(fab: Fabric) -> None:
    async with zfabric.Client(fab.address) as client:
        seen, following = await _follow(client)
        handle = client.submit(f"{TASKS}:fail", "the disk is full")
        with pytest.raises(zfabric.TaskError):
            await handle
        await async_wait_for(lambda: any(e["event"] == "failed" for e in seen), 10, "the failed event")
        following.cancel()
        failed = next(e for e in seen if e["event"] == "failed")
        assert failed["task"] == handle.id and failed["error"] == {"type": "ValueError", "message": "the disk is full"}
        status = await client.status()
        recent = [f for f in status["recent_failures"] if f["task"] == handle.id]
        assert recent and recent[0]["type"] == "ValueError" and recent[0]["message"] == "the disk is full"
        assert recent[0]["worker"] in {w["name"] for w in status["workers"]}


async def test_worker_events_when_a_worker_joins_and_is_killed(fab: Fabric) -> None:
    async with zfabric.Client(fab.address) as client:
        seen, following = await _follow(client)
        proc = subprocess.Popen(zfabric_cmd("--log-level", "warning", "worker", fab.address, "--app", TASKS,
                                            "--name", "short-lived"), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            read_line_matching(proc, "ZFABRIC-READY", 60)
            await async_wait_for(lambda: any(e["event"] == "worker-joined" for e in seen), 10, "worker-joined")
            proc.kill()
            proc.wait(10)
            await async_wait_for(lambda: any(e["event"] == "worker-lost" for e in seen), 20, "worker-lost")
        finally:
            if proc.poll() is None:
                proc.kill()
            if proc.stdout:
                proc.stdout.close()
        following.cancel()
        joined = next(e for e in seen if e["event"] == "worker-joined")
        lost = next(e for e in seen if e["event"] == "worker-lost")
        assert joined["worker"] == lost["worker"] == "short-lived" and joined["pid"] == proc.pid
        assert lost["why"]


async def test_a_follower_that_falls_behind_is_told_how_much_it_missed_and_slows_nothing(fab: Fabric) -> None:
    """A SUB socket that reads nothing while 100 others follow: the scheduler sends on, drops for it, and
    the numbering says how many events it lost; the map is not held up."""
    ctx = zmq.Context()
    try:
        async with zfabric.Client(fab.address) as client:
            address = (await client.status())["events"]
            crowd = [_subscriber(ctx, address, b"", RCVHWM=1, RCVBUF=4096) for _ in range(100)]
            await _followed(client)
            for _ in range(12):  # more EVENTS messages than a follower is kept (EVENTS_HWM and buffers)
                started = time.monotonic()
                await client.map(f"{TASKS}:inc", range(50_000))
                assert time.monotonic() - started < 20, "100 followers held the fabric up"
                status_started = time.monotonic()
                await client.status()
                assert time.monotonic() - status_started < 2, "the scheduler was slow to answer its status"
            follower = Follower()
            lost = received = 0
            for _ in range(2):  # what it was kept, then what comes once it reads again: the gap between
                while crowd[0].poll(500):
                    kind, message = decode(crowd[0].recv())
                    received += 1
                    lost += sum(e["count"] for e in follower.feed(message) if e["event"] == "lost")
                await client.map(f"{TASKS}:inc", range(1000))
            assert received and lost > 0, f"a follower that did not read lost nothing ({received} messages)"
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(30)
def test_the_follower_counts_gaps_and_skips_malformed_records() -> None:
    follower = Follower()
    first = follower.feed(Events(0, 1.0, [["done", "w", [1, 2]], ["nonsense"], ["failed", "w", [3, "E", "m"]]]))
    assert [e["event"] for e in first] == ["done", "done", "failed"] and follower.malformed == 1
    assert follower.feed(Events(10, 2.0, [["worker-joined", "w2", ["host", 7]]])) == [
        {"event": "lost", "t": 2.0, "count": 7}, {"event": "worker-joined", "t": 2.0, "worker": "w2", "host": "host", "pid": 7}]
    kind, message = decode(encode(Events(11, 4.0, [["cancelled", "", [9]]])))
    assert kind == Kind.EVENTS and follower.feed(message) == [{"event": "cancelled", "t": 4.0, "task": 9}]
    # numbered lower: a restarted scheduler counts from 0 again; no gap is made up from the old numbering
    assert follower.feed(Events(0, 5.0, [["done", "w", [1]]])) == [{"event": "done", "t": 5.0, "worker": "w", "task": 1}]
    assert follower.feed(Events(3, 6.0, [])) == [{"event": "lost", "t": 6.0, "count": 2}]
    assert follower.feed(Events(3, float("nan"), [])) == [] and follower.malformed == 2
    host_bytes = follower.feed(Events(3, 7.0, [["worker-joined", "w", [b"host", 1]], ["failed", "w", [4, b"E", "m"]]]))
    assert host_bytes == [{"event": "worker-joined", "t": 7.0, "worker": "w"}], "unchecked values would break JSON"


async def test_status_json_has_the_fields_of_the_spec_and_peers_bad_input(fab: Fabric) -> None:
    async with zfabric.Client(fab.address) as client:
        await client.map(f"{TASKS}:inc", range(10))
        # anyone can push into a client's sink: the client counts the garbage and reports it with its hello
        ctx = zmq.Context()
        try:
            push = ctx.socket(zmq.PUSH)
            push.connect(client.sink_address)
            push.send(b"\xc1 not msgpack")
            await async_wait_for(lambda: sum(client.bad_input.counts.values()) > 0, 10, "the client to count it")
        finally:
            ctx.destroy(linger=0)

        async def reported() -> bool:
            status = await client.status()
            return any(c["bad_input"] for c in status["client_list"])
        await async_wait_for(reported, 10, "the client's bad input in the status")
    out = subprocess.run(zfabric_cmd("status", fab.address, "--json"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    for key in ("workers", "queued", "running", "done", "failed", "lost", "redelivered", "bad_input"):
        assert key in status, key
    assert len(status["workers"]) == 2
    for worker in status["workers"]:
        assert {"name", "host", "pid", "running", "free", "done", "bad_input"} <= set(worker), worker
    assert status["done"] >= 10


# ---- found by a hostile review (each failed before its fix) ------------------------------------------

async def test_a_strangers_topics_cannot_switch_recording_off_under_a_follower(fab: Fabric) -> None:
    ctx = zmq.Context()
    try:
        async with zfabric.Client(fab.address) as client:
            address = (await client.status())["events"]
            junk = [_subscriber(ctx, address, b"topic%d" % i) for i in range(50)]
            seen, following = await _follow(client)
            for sub in junk:
                sub.close(linger=0)
            await client.map(f"{TASKS}:inc", range(20))
            await async_wait_for(lambda: sum(e["event"] == "done" for e in seen) >= 20, 10,
                                 "the follower to see the tasks after the strangers left")
            assert (await client.status())["events_followed"] is True
            following.cancel()
    finally:
        ctx.destroy(linger=0)


async def test_a_follower_carries_on_across_a_scheduler_restart(tmp_path: Any) -> None:
    from conftest import free_port_pair
    address = f"tcp://127.0.0.1:{free_port_pair()}"

    def scheduler() -> subprocess.Popen[str]:
        proc = subprocess.Popen(zfabric_cmd("--log-level", "warning", "scheduler", "--bind", address),
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        read_line_matching(proc, "ZFABRIC-READY", 30)
        return proc
    procs = [scheduler()]
    worker = subprocess.Popen(zfabric_cmd("--log-level", "warning", "worker", address, "--app", TASKS),
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        read_line_matching(worker, "ZFABRIC-READY", 30)
        async with zfabric.Client(address) as client:
            seen, following = await _follow(client)
            procs[0].kill()
            procs[0].wait(10)
            procs.append(scheduler())
            await async_wait_for(lambda: any(e["event"] == "scheduler-restarted" for e in seen), 30,
                                 "the follower to notice the restart")
            await _followed(client)
            assert await client.map(f"{TASKS}:inc", range(10)) == list(range(1, 11))
            await async_wait_for(lambda: sum(e["event"] == "done" for e in seen) >= 10, 10,
                                 "events from the new scheduler")
            following.cancel()
    finally:
        for proc in [worker, *procs]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


@pytest.mark.timeout(60)
def test_failed_tasks_are_never_reported_done_and_status_decodes_with_many_workers() -> None:
    from zfabric.config import SchedulerConfig
    from zfabric.protocol import StatusReply
    from zfabric.scheduling import SchedulerState
    from zfabric.worker_state import MAX_ERRORS
    state = SchedulerState(SchedulerConfig(), 1)
    state.events = []
    state.worker_hello(b"w", "w", 1, 1000, [], 1, "h", 0.0)
    state.submit(b"c" * 16, "tcp://127.0.0.1:1", "", [x for i in range(150) for x in (i + 1, 0, b"call")], 0.0)
    state.dispatch()
    errors = [x for i in range(150) for x in ((i + 1, "ValueError", "bad") if i < MAX_ERRORS else (i + 1, "", ""))]
    state.worker_done(b"w", 1, 1, 150, list(range(1, 151)), 150, [], 0.1, errors)
    done = [r for r in state.events if r[0] == "done"]
    assert not any(r[2] for r in done), "failed tasks were reported done"
    assert sum(len(r[2]) // 3 for r in state.events if r[0] == "failed") == 150
    for i in range(6000):  # tagged workers: each costs the status reply several containers
        state.worker_hello(b"x%d" % i, "n" * 500, 1, 1, [], 1, "h" * 500, 0.0, ["gpu"], {"gpu": 1})
    kind, reply = decode(encode(StatusReply(state.status())))
    assert len(reply.status["workers"]) == 6001 and len(reply.status["workers"][-1]["name"]) <= 128
