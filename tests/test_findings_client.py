"""Regression tests for client-side findings of the outside checks (4, 6, 7, 9, 10).

Real processes and real sockets throughout; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from typing import Any

import pytest
import zmq
import zmq.asyncio

import zfabric
from zfabric import demo_tasks
from zfabric.errors import SubmitError
from zfabric.handle import SENT, Handle
from zfabric.protocol import MAX_FRAME_BYTES, Kind, decode, encode_fields, encode_call
from conftest import LOOPBACK, ROOT, TASKS, Fabric, async_wait_for, free_port_pair, read_line_matching, zfabric_cmd


# ---- 4. a forged CANCEL / CLIENT_BYE must not touch another client's tasks ------------------------------


@pytest.mark.timeout(30)
async def test_forged_cancel_and_bye_from_task_ids_do_not_cancel_a_victims_tasks(own_fabric: Any) -> None:
    fabric: Fabric = own_fabric(workers=1)
    ctx = zmq.asyncio.Context.instance()
    attacker = ctx.socket(zmq.PUSH)
    reply = ctx.socket(zmq.PULL)
    attacker.setsockopt(zmq.LINGER, 0)
    reply.setsockopt(zmq.LINGER, 0)
    try:
        async with zfabric.Client(fabric.address) as victim:
            handles = [victim.submit(demo_tasks.asleep, 1.5, value=i) for i in range(8)]

            async def all_running() -> bool:
                st = await victim.status()
                return st["running"] >= len(handles)
            await async_wait_for(all_running, 10, "the victim's tasks to be running")
            ids = [h.id for h in handles]
            guesses = {(task_id >> 32 << 32).to_bytes(8, "big") for task_id in ids}
            attacker.connect(fabric.address)
            port = reply.bind_to_random_port(f"tcp://{LOOPBACK}")
            for cid_guess in guesses:
                await attacker.send(encode_fields(Kind.CANCEL, cid_guess, "", ids))
                await attacker.send(encode_fields(Kind.CLIENT_BYE, cid_guess, ""))
            # A status request on the same connection is answered only after the forged frames were handled.
            await attacker.send(encode_fields(Kind.STATUS_REQUEST, f"tcp://{LOOPBACK}:{port}"))
            kind, fields = decode(await asyncio.wait_for(reply.recv(), 10))
            assert kind == Kind.STATUS_REPLY
            assert fields[0]["cancelled"] == 0, fields[0]
            assert await asyncio.wait_for(victim.gather(handles), 15) == list(range(len(handles)))
            assert (await victim.status())["cancelled"] == 0
            # the client id is a secret unrelated to the task ids
            assert len(victim._client_id) == 16
            assert victim._client_id not in guesses
    finally:
        attacker.close()
        reply.close()


# ---- 6. a raising done-callback must not lose the rest of its result batch ------------------------------


@pytest.mark.timeout(30)
async def test_raising_done_callback_loses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # audit_s is long so no audit can recover a dropped result: only a correct batch delivers them all
    async with zfabric.local(workers=2, app=[TASKS], audit_s=60) as client:
        assert await client.submit(demo_tasks.inc, 0) == 1  # warm up: workers connected to the sink
        # async tasks finishing together, so each worker sends their results in few, large RESULT frames
        handles = [client.submit(demo_tasks.asleep, 0.3, value=i + 1) for i in range(1000)]
        later: list[Handle] = []

        def boom(_: Handle) -> None:
            raise RuntimeError("a user callback failed")
        handles[250].add_done_callback(boom)
        handles[250].add_done_callback(later.append)
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="zfabric.handle"):
            await async_wait_for(lambda: all(h.done() for h in handles), 5, "all 1000 results")
        elapsed = time.monotonic() - started
        assert elapsed < 1.9, elapsed  # well under the 2 s audit interval: nothing waited for a resubmission
        assert [h.result() for h in handles] == list(range(1, 1001))
        assert later == [handles[250]]
        assert client.resubmitted == 0
        assert any("a user callback failed" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


# ---- 7. payloads over the frame limit fail at submit; batches never exceed the limit --------------------


@pytest.mark.timeout(60)
async def test_oversize_argument_fails_at_submit_and_batches_stay_under_the_frame_limit() -> None:
    async with zfabric.local(workers=2, app=[TASKS]) as client:
        big = b"x" * 70_000_000
        small: list[Handle] = [client.submit(demo_tasks.inc, i) for i in range(5)]
        with pytest.raises(SubmitError) as info:
            client.submit(demo_tasks.size, big)
        message = str(info.value)
        assert "70000" in message.replace(",", "").replace("_", ""), message
        assert str(MAX_FRAME_BYTES) in message.replace(",", "").replace("_", ""), message
        assert isinstance(info.value, TypeError)
        small += [client.submit(demo_tasks.inc, i) for i in range(5, 10)]
        assert await asyncio.wait_for(client.gather(small), 20) == list(range(1, 11))

        # a 20 MB argument among small tasks, all in one turn, and several large ones (no frame over the limit)
        twenty = b"y" * 20_000_000
        mixed = [client.submit(demo_tasks.inc, i) for i in range(5)]
        mixed.append(client.submit(demo_tasks.size, twenty))
        mixed += [client.submit(demo_tasks.inc, i) for i in range(5, 10)]
        mixed += [client.submit(demo_tasks.size, twenty) for _ in range(3)]
        assert await asyncio.wait_for(client.gather(mixed), 40) == \
            [1, 2, 3, 4, 5, 20_000_000, 6, 7, 8, 9, 10] + [20_000_000] * 3


# ---- 9. a client whose loop stalls past the scheduler's client timeout keeps its tasks ------------------


def _spawn_ready(argv: list[str], started: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=ROOT, start_new_session=True)
    started.append(proc)
    read_line_matching(proc, r"^ZFABRIC-READY", 60)
    return proc


@pytest.mark.timeout(60)
async def test_stalled_client_gets_values_not_spurious_cancellations() -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    started: list[subprocess.Popen[str]] = []
    client_timeout = 1.0
    try:
        await asyncio.to_thread(_spawn_ready, zfabric_cmd("--log-level", "warning", "scheduler", "--bind", address,
                                                          "--client-timeout-s", str(client_timeout)), started)
        await asyncio.to_thread(_spawn_ready, zfabric_cmd("--log-level", "warning", "worker", address,
                                                          "--app", TASKS), started)
        async with zfabric.Client(address, timeout_s=30) as client:
            handles = [client.submit(demo_tasks.asleep, 3.0, value=i) for i in range(20)]

            async def all_running() -> bool:
                st = await client.status()
                return st["running"] >= len(handles)
            await async_wait_for(all_running, 10, "the tasks to be running")
            # The fault injected: this client's own event loop blocks for longer than the scheduler's client
            # timeout, so the scheduler forgets it and cancels its running tasks on the worker.
            time.sleep(client_timeout + 1.5)  # sync-ok: the fault under test, not synchronisation
            results = await asyncio.wait_for(client.gather(handles), 20)
            assert results == list(range(len(handles)))
            assert client.resubmitted >= len(handles)
            assert client.unasked_cancels > 0  # the scheduler did forget us and cancel them on the worker
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


# ---- 10. the audit recovers lost results when a round spans several AUDIT chunks ------------------------


@pytest.mark.timeout(30)
async def test_audit_recovers_lost_tasks_across_chunks_of_one_round() -> None:
    async with zfabric.local(workers=1, app=[TASKS], audit_s=600) as client:
        client.audit_chunk = 2  # two AUDIT frames (and two MISSING replies) per round
        assert await client.submit(demo_tasks.inc, 0) == 1
        # Four tasks this client counts as sent that the scheduler never got (a lost SUBMIT, say).
        lost: list[Handle] = []
        for i in range(4):
            client._seq += 1
            handle = Handle(client._id_base + client._seq, client, encode_call(f"{TASKS}:inc", [i], {}, {}), 0)
            handle.state = SENT
            client._handles[handle.id] = handle
            client._in_scheduler += 1
            lost.append(handle)
        replies: list[list[Any]] = []
        on_missing = client._on_missing

        def counting(ids: list[Any]) -> None:
            replies.append(list(ids))
            on_missing(ids)
        client._on_missing = counting  # type: ignore[method-assign]

        client._audit()  # round 1: two chunks, every task missing once
        await async_wait_for(lambda: len(replies) == 2, 10, "round 1's two MISSING replies")
        assert client.resubmitted == 0
        assert sorted(i for r in replies for i in r) == sorted(h.id for h in lost)
        client._audit()  # round 2: missing again -> all four are submitted again
        await async_wait_for(lambda: len(replies) == 4, 10, "round 2's two MISSING replies")
        assert client.resubmitted == 4
        assert await asyncio.wait_for(client.gather(lost), 10) == [1, 2, 3, 4]
