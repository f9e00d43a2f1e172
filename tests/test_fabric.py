"""The whole fabric through the public API: real processes, real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time

import psutil
import pytest

import zfabric
from zfabric import demo_tasks
from conftest import TASKS, Fabric

pytestmark = pytest.mark.timeout(60)


async def test_sync_and_async_functions_by_name_and_object(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        assert await client.submit(f"{TASKS}:add", 2, 40) == 42
        assert await client.submit(demo_tasks.add, 1, b=2) == 3
        assert await client.submit(demo_tasks.asleep, 0.01, value="a") == "a"
        assert await client.submit(f"{TASKS}:aecho", [1, {"k": None}]) == [1, {"k": None}]


async def test_map_keeps_order(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        assert await client.map(demo_tasks.inc, range(2000)) == list(range(1, 2001))
        assert await client.map(demo_tasks.add, [1, 2, 3], [10, 20, 30]) == [11, 22, 33]


async def test_map_streams_a_lazy_iterable_with_a_bounded_window(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        peak = 0

        def items():
            nonlocal peak
            for i in range(3000):
                peak = max(peak, client.pending)
                yield i
        results = [r async for r in client.imap(demo_tasks.inc, items(), window=100)]
        assert results == list(range(1, 3001))
        assert peak <= 100


async def test_bytes_round_trip(fabric: Fabric) -> None:
    blob = bytes(range(256)) * 40
    async with zfabric.Client(fabric.address) as client:
        value = await client.submit(demo_tasks.echo, blob)
        assert type(value) is bytes and value == blob
        assert await client.submit(demo_tasks.echo, "text") == "text"
        echoed = await client.submit(demo_tasks.echo, (1, 2))
        assert type(echoed) is tuple and echoed == (1, 2)  # values keep their type (tests/test_values.py)


async def test_remote_exception_is_a_task_error(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        with pytest.raises(zfabric.TaskError) as info:
            await client.submit(demo_tasks.fail, "x")
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "x"
        assert "ValueError" in str(info.value) and "x" in str(info.value)
        assert "demo_tasks.py" in info.value.remote_traceback


async def test_functions_outside_the_apps_are_refused_and_nothing_runs(fabric: Fabric, tmp_path) -> None:
    marker = tmp_path / "ran"
    async with zfabric.Client(fabric.address) as client:
        for name in ("os:system", "zfabric.demo_tasks:time", "builtins:eval", "zfabric.demo_tasks:missing"):
            with pytest.raises(zfabric.TaskRejected) as info:
                await client.submit(name, f"touch {marker}")
            assert "not allowed" in str(info.value) or "not a function defined" in str(info.value)
        with pytest.raises(zfabric.ConfigError, match="bad function reference"):
            client.submit("zfabric.demo_tasks:_private")
        assert not marker.exists()
        assert await client.submit(demo_tasks.inc, 1) == 2  # still serving


async def test_unencodable_argument_fails_at_submit(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        with pytest.raises(TypeError, match=r"argument 1 \(object\)"):
            client.submit(demo_tasks.add, 1, object())
        with pytest.raises(zfabric.SubmitError, match="keyword argument 'b'"):
            client.submit(demo_tasks.add, 1, b=object())
        with pytest.raises(zfabric.ConfigError, match="__main__|top level"):
            client.submit(lambda: 1)
        assert client.pending == 0


async def test_both_workers_are_used(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        pids = await asyncio.gather(*[client.submit(demo_tasks.apid, 0.05) for _ in range(40)])
        assert len(set(pids)) == 2
        assert set(pids) == {p.pid for p in fabric.workers()}


async def test_as_completed_yields_in_finish_order(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        handles = [client.submit(demo_tasks.asleep, d, d) for d in (3.0, 0.0, 1.0)]
        order = [h.result() async for h in zfabric.as_completed(handles)]
        assert order == [0.0, 1.0, 3.0]
        assert all(h.done() for h in handles)


async def test_cancel_a_running_task(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        handle = client.submit(demo_tasks.asleep, 30)
        assert isinstance(handle.id, int) and not handle.done()
        await asyncio.sleep(0.2)  # sync-ok: let it start running somewhere
        assert handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        assert handle.cancelled() and not handle.cancel()
        status = await client.status()
        deadline = time.monotonic() + 10
        while status["running"] and time.monotonic() < deadline:
            status = await client.status()
        assert status["running"] == 0


async def test_options_priority_timeout_and_retries(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        with pytest.raises(zfabric.TaskTimeout, match="timeout"):
            await client.options(timeout_s=0.2).submit(demo_tasks.asleep, 5)
        with pytest.raises(zfabric.TaskError) as info:
            await client.options(retries=2, backoff_s=0.01).submit(demo_tasks.fail, "again")
        assert info.value.remote_type == "ValueError"
        status = await client.status()
        assert status["retried"] >= 2
        with pytest.raises(zfabric.ConfigError, match="unknown option"):
            client.options(bogus=1)
        # options never collide with the task's own keyword arguments
        assert await client.options(priority=3).submit(demo_tasks.asleep, 0, value={"timeout_s": 1}) == {
            "timeout_s": 1}


async def settled_status(client: zfabric.Client, done_at_least: int) -> dict:
    """The scheduler's status once it has heard of `done_at_least` finished tasks and holds none: workers
    report a lone task's DONE up to DONE_LINGER_S late, so a status taken at once may lag its results."""
    deadline = time.monotonic() + 10
    status = await client.status()
    while (status["done"] < done_at_least or status["running"] or status["queued"]) and time.monotonic() < deadline:
        status = await client.status()
    return status


async def test_status_counts(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        await client.map(demo_tasks.inc, range(10))
        status = await settled_status(client, 10)
        assert len(status["workers"]) == 2 and status["done"] >= 10 and status["address"] == fabric.address


async def test_lingering_done_reaches_the_scheduler(fabric: Fabric) -> None:
    """One task at a time: each result comes back before its DONE leaves the worker, and every DONE
    still arrives (the scheduler ends holding nothing, every slot free again)."""
    async with zfabric.Client(fabric.address) as client:
        before = (await settled_status(client, 0))["done"]
        for i in range(20):
            assert await client.submit(demo_tasks.inc, i) == i + 1
        status = await settled_status(client, before + 20)
        assert status["done"] == before + 20 and status["running"] == 0
        assert all(w["running"] == 0 for w in status["workers"])


def test_sync_client(fabric: Fabric) -> None:
    with zfabric.SyncClient(fabric.address) as client:
        assert client.submit(f"{TASKS}:add", 2, 40).result(10) == 42
        assert client.map(demo_tasks.inc, range(100)) == list(range(1, 101))
        with pytest.raises(zfabric.TaskError, match="ValueError"):
            client.submit(demo_tasks.fail, "boom").result(10)
        assert client.options(timeout_s=5).submit(demo_tasks.inc, 1).result(10) == 2
    with zfabric.Client(fabric.address).sync() as client:
        assert client.submit(demo_tasks.inc, 1).result(10) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_fabric_gives_a_clear_error_not_a_hang() -> None:
    t = time.monotonic()
    with pytest.raises(zfabric.FabricUnreachable, match="no scheduler answered"):
        async with zfabric.Client(f"tcp://127.0.0.1:{_free_port()}", timeout_s=1.0):
            pass
    assert time.monotonic() - t < 5


def test_sync_client_unreachable() -> None:
    with pytest.raises(zfabric.FabricUnreachable):
        zfabric.SyncClient(f"tcp://127.0.0.1:{_free_port()}", timeout_s=0.5)


async def test_local_fabric_starts_and_leaves_nothing() -> None:
    fabric = zfabric.local(workers=2, app=[TASKS])
    async with fabric as client:
        pids = fabric.supervisor.pids()
        assert len(pids) == 3
        assert fabric.address.startswith("ipc://")  # private to this user: its directory is mode 0700
        socket_dir = os.path.dirname(fabric.address[len("ipc://"):])
        assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o700
        assert await client.map(demo_tasks.inc, range(100)) == list(range(1, 101))
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(socket_dir)


async def test_local_fabric_on_tcp_when_asked() -> None:
    fabric = zfabric.local(workers=1, app=[TASKS], host="127.0.0.1")
    async with fabric as client:
        assert fabric.address.startswith("tcp://127.0.0.1:")
        assert await client.submit(demo_tasks.inc, 41) == 42


def test_bad_addresses_are_refused_clearly() -> None:
    with pytest.raises(zfabric.ConfigError, match="expected tcp://HOST:PORT"):
        zfabric.Client("localhost:7100")
    with pytest.raises(zfabric.ConfigError, match="port"):
        zfabric.Client("tcp://127.0.0.1:70000")


async def test_sync_task_timeout_stops_the_work(fabric: Fabric, tmp_path) -> None:
    marker = tmp_path / "finished"
    async with zfabric.Client(fabric.address) as client:
        t = time.monotonic()
        with pytest.raises(zfabric.TaskTimeout, match="killed"):
            await client.options(timeout_s=0.5).submit(demo_tasks.slow_then_touch, 3.0, str(marker))
        assert time.monotonic() - t < 2.5
        # a timed task that finishes in time returns normally, from a (replacement) child process
        assert await client.options(timeout_s=5).submit(demo_tasks.slow, 0.01, "ok") == "ok"
        worker_pids = {p.pid for p in fabric.workers()}
        child_pid = await client.options(timeout_s=5).submit(demo_tasks.pid)
        assert child_pid not in worker_pids
        # the overrunning call really stopped: it never reaches the end of its sleep
        await asyncio.sleep(3.0)  # sync-ok: the killed task would have finished by now
        assert not marker.exists()


async def test_map_with_progress_draws_a_line_that_ends_at_the_total(fabric: Fabric,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    async with zfabric.Client(fabric.address) as client:
        assert await client.map(demo_tasks.inc, range(3000), progress=True) == list(range(1, 3001))
        assert await client.map(demo_tasks.inc, range(10)) == list(range(1, 11))
    err = capsys.readouterr().err
    assert "3,000/3,000" in err and "100%" in err and err.count("\n") == 1  # one bar, for the map that asked
