"""`zfabric.Executor` as a `concurrent.futures.Executor`, on real fabrics in real processes.

Modelled on CPython's Lib/test/test_concurrent_futures: one shared local
executor for the behaviour of futures, and an executor of its own for each
test of starting, shutting down or collecting one.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import sys
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import psutil
import pytest

import zfabric
from zfabric.demo_tasks import add, asleep, echo, fail, inc
from conftest import TASKS, Fabric, wait_for

pytestmark = pytest.mark.timeout(120)

APPS = [TASKS, "sys"]  # "sys" so that `sys.exit` itself can be a task


@pytest.fixture(scope="module")
def ex() -> Iterator[zfabric.Executor]:
    """A local 2-worker executor shared by the tests that do not shut it down."""
    executor = zfabric.Executor(workers=2, app=APPS)
    yield executor
    executor.shutdown(cancel_futures=True)


def fabric_children() -> set[psutil.Process]:
    """This process's zfabric scheduler and worker processes."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "zfabric" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.add(child)
        except psutil.NoSuchProcess:
            pass
    return found


def all_gone(procs: set[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def running_tasks(address: str) -> int:
    with zfabric.SyncClient(address) as client:
        return int(client.status()["running"])


# ---- submit ---------------------------------------------------------------------------------


def test_submit_returns_a_concurrent_future(ex: zfabric.Executor) -> None:
    assert "Executor" in zfabric.__all__
    future = ex.submit(inc, 1)
    assert type(future) is concurrent.futures.Future
    assert future.result(30) == 2
    assert ex.submit("zfabric.demo_tasks:inc", 41).result(30) == 42


def test_submit_keyword_arguments(ex: zfabric.Executor) -> None:
    assert ex.submit(add, 1, b=2).result(30) == 3
    assert ex.submit(add, a=10, b=20).result(30) == 30
    assert ex.submit(echo, value={"k": [1, 2]}).result(30) == {"k": [1, 2]}


def test_submit_from_several_threads(ex: zfabric.Executor) -> None:
    def submit_many(base: int) -> list[concurrent.futures.Future[Any]]:
        return [ex.submit(add, base, i) for i in range(50)]

    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(submit_many, range(0, 8000, 1000)))
    for base, futures in zip(range(0, 8000, 1000), batches):
        assert [f.result(30) for f in futures] == [base + i for i in range(50)]


def test_cancelling_a_future_cancels_its_task(ex: zfabric.Executor) -> None:
    future = ex.submit(asleep, 60, "never")
    wait_for(lambda: running_tasks(ex.address) == 1, 30, "the task to start")
    assert future.cancel()
    assert future.cancelled()
    wait_for(lambda: running_tasks(ex.address) == 0, 30, "the task to be cancelled on its worker")


# ---- map ------------------------------------------------------------------------------------


def test_map_in_order_and_lazy(ex: zfabric.Executor) -> None:
    results = ex.map(inc, range(200))
    assert iter(results) is results and not isinstance(results, list)
    assert list(results) == list(range(1, 201))
    assert list(ex.map(add, range(5), range(10, 13))) == [10, 12, 14]  # stops at the shortest iterable
    assert list(ex.map("zfabric.demo_tasks:inc", [])) == []


def test_map_chunksize(ex: zfabric.Executor) -> None:
    assert list(ex.map(inc, range(50), chunksize=7)) == list(range(1, 51))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(inc, range(5), chunksize=bad)


def test_map_timeout(ex: zfabric.Executor) -> None:
    start = time.monotonic()
    results = ex.map(asleep, [0, 60], ["first", "second"], timeout=2.0)
    assert next(results) == "first"
    with pytest.raises(TimeoutError):
        next(results)
    elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < 20, elapsed  # the deadline counts from the map call
    with pytest.raises(StopIteration):
        next(results)
    wait_for(lambda: running_tasks(ex.address) == 0, 30, "the timed-out task to be cancelled")


def test_map_raises_the_first_exception(ex: zfabric.Executor) -> None:
    with pytest.raises(zfabric.TaskError, match="first"):
        list(ex.map(fail, ["first", "second"]))
    results = ex.map(add, [1, 2, None, 4], [1, 1, 1, 1])
    assert next(results) == 2
    assert next(results) == 3
    with pytest.raises(zfabric.TaskError) as info:
        next(results)
    assert info.value.remote_type == "TypeError"


# ---- futures of different executors together -------------------------------------------------


def test_wait_and_as_completed_mix_with_thread_pool_futures(ex: zfabric.Executor) -> None:
    with ThreadPoolExecutor(1) as pool:
        futures = [ex.submit(asleep, 0.2, "fabric"), pool.submit(pow, 2, 5), ex.submit(inc, 1)]
        done, not_done = concurrent.futures.wait(futures, timeout=30)
        assert done == set(futures) and not not_done
        assert sorted(map(str, (f.result() for f in concurrent.futures.as_completed(futures, 30)))) == \
            ["2", "32", "fabric"]

        slow = ex.submit(asleep, 60)
        quick = pool.submit(int, "7")
        done, not_done = concurrent.futures.wait([slow, quick], timeout=30, return_when=FIRST_COMPLETED)
        assert done == {quick} and not_done == {slow}

        failing = ex.submit(fail, "boom")
        done, not_done = concurrent.futures.wait([slow, failing], timeout=30, return_when=FIRST_EXCEPTION)
        assert done == {failing} and not_done == {slow}
        assert isinstance(failing.exception(), zfabric.TaskError)
        assert slow.cancel()


# ---- a task that exits ----------------------------------------------------------------------


def test_task_calling_sys_exit_fails_its_future_only(ex: zfabric.Executor) -> None:
    future = ex.submit(sys.exit, 3)
    error = future.exception(30)
    assert isinstance(error, zfabric.TaskError) and isinstance(error, Exception)
    assert error.remote_type == "SystemExit"
    with pytest.raises(Exception, match="SystemExit"):  # catchable: it does not end the caller
        ex.submit("sys:exit", "bye").result(30)
    assert list(ex.map(inc, range(4))) == [1, 2, 3, 4]  # the workers are still there


# ---- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_below_one_raises_value_error(workers: int) -> None:
    before = fabric_children()
    with pytest.raises(ValueError, match="workers"):
        zfabric.Executor(workers=workers, app=[TASKS])
    assert fabric_children() == before


def test_workers_and_address_are_exclusive() -> None:
    with pytest.raises(ValueError, match="address"):
        zfabric.Executor(workers=1, address="tcp://127.0.0.1:7100")


def test_swap_from_process_pool_executor() -> None:
    """The same program runs on a `ProcessPoolExecutor` and on an `Executor` (one worker per CPU by default)."""

    def program(pool: concurrent.futures.Executor) -> list[Any]:
        with pool:
            squares = list(pool.map(inc, range(10), chunksize=3))
            total = pool.submit(add, 1, b=2).result(30)
            finished = sorted(f.result() for f in concurrent.futures.as_completed(
                [pool.submit(inc, i) for i in range(5)], timeout=30))
        return [squares, total, finished]

    expected = program(ProcessPoolExecutor())
    before = fabric_children()
    executor = zfabric.Executor(app=[TASKS])
    workers = [p for p in fabric_children() - before if "worker" in p.cmdline()]
    assert len(workers) == (os.cpu_count() or 1)
    assert program(executor) == expected


# ---- shutdown -------------------------------------------------------------------------------


def test_context_manager_shuts_down() -> None:
    before = fabric_children()
    with zfabric.Executor(workers=1, app=[TASKS]) as executor:
        started = fabric_children() - before
        assert len(started) == 2  # a scheduler and a worker
        assert executor.submit(inc, 1).result(30) == 2
    assert all_gone(started)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(inc, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(inc, range(3))
    executor.shutdown()  # a second shutdown is harmless


def test_shutdown_wait_true_waits_for_pending_futures() -> None:
    before = fabric_children()
    executor = zfabric.Executor(workers=1, app=[TASKS])
    started = fabric_children() - before
    futures = [executor.submit(asleep, 0.5, i) for i in range(3)]
    executor.shutdown(wait=True)
    assert [f.result(0) for f in futures] == [0, 1, 2]
    assert all_gone(started)


def test_shutdown_wait_false_returns_at_once_and_finishes_in_background() -> None:
    before = fabric_children()
    executor = zfabric.Executor(workers=1, app=[TASKS])
    started = fabric_children() - before
    future = executor.submit(asleep, 1, "late")
    executor.shutdown(wait=False)
    assert not future.done()  # it returned before the task could finish
    with pytest.raises(RuntimeError):
        executor.submit(inc, 1)
    assert future.result(30) == "late"  # and the pending task still ran to its end
    wait_for(lambda: all_gone(started), 30, "the fabric to stop")
    executor.shutdown(wait=True)  # waits for that background shutdown


def test_shutdown_cancel_futures() -> None:
    executor = zfabric.Executor(workers=1, app=[TASKS])
    finished = executor.submit(inc, 1)
    assert finished.result(30) == 2
    pending = [executor.submit(asleep, 60, i) for i in range(5)]
    start = time.monotonic()
    executor.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - start < 30  # did not wait for the 60 s tasks
    assert all(f.cancelled() for f in pending)
    assert finished.result() == 2


def test_no_reference_leak_after_shutdown() -> None:
    executor = zfabric.Executor(workers=1, app=[TASKS])
    futures = [executor.submit(inc, i) for i in range(10)] + [executor.submit(fail, "x")]
    assert list(executor.map(inc, range(10))) == list(range(1, 11))
    executor.shutdown()
    ref = weakref.ref(executor)
    del executor
    gc.collect()
    assert ref() is None
    assert [f.result(0) for f in futures[:-1]] == list(range(1, 11))  # the futures outlive it


def test_collected_executor_tears_down_its_fabric() -> None:
    before = fabric_children()
    executor = zfabric.Executor(workers=1, app=[TASKS])
    started = fabric_children() - before
    assert len(started) == 2
    assert executor.submit(inc, 1).result(30) == 2
    ref = weakref.ref(executor)
    del executor
    gc.collect()
    assert ref() is None
    wait_for(lambda: all_gone(started), 30, "the collected executor's scheduler and worker to exit")
    wait_for(lambda: not any(t.name == "zfabric-executor-shutdown" for t in threading.enumerate()), 30,
             "the shutdown thread to end")


# ---- attached to a running fabric -----------------------------------------------------------


def test_attached_executor_leaves_the_fabric_running(own_fabric: Callable[..., Fabric]) -> None:
    fabric = own_fabric(workers=1)
    with zfabric.Executor(address=fabric.address) as executor:
        assert executor.address == fabric.address
        assert list(executor.map(inc, range(20))) == list(range(1, 21))
        assert executor.submit(add, 1, b=2).result(30) == 3
    assert fabric.proc.poll() is None and all(p.is_running() for p in fabric.tree())
    with zfabric.Executor(address=fabric.address) as again:  # the fabric still serves
        assert again.submit(inc, 1).result(30) == 2


def test_map_with_progress(ex: zfabric.Executor, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(ex.map(inc, range(500), progress=True)) == list(range(1, 501))
    assert "500/500" in capsys.readouterr().err
