"""Routing (SPEC §8): worker tags and resources, task ``tags=``/``resources=``, in real processes.

A fabric of one plain worker (`zfabric up`) is joined by workers started with `zfabric worker --tag ...
--resources ...`. Tasks report the pid that ran them, so each test checks where every task went.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from typing import Any, Iterator

import pytest

import zfabric
from zfabric.config import SchedulerConfig
from zfabric.protocol import Kind, decode
from zfabric.routing import Equipment, make_route, parse_resources_spec, placement
from zfabric.scheduling import SchedulerState

from conftest import ROOT, TASKS, Fabric, async_wait_for, read_line_matching, start_fabric, zfabric_cmd

pytestmark = pytest.mark.timeout(90)


class Workers:
    """Extra `zfabric worker` processes joining a fabric; all are killed at teardown."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, name: str, *flags: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(zfabric_cmd("--log-level", "warning", "worker", self.address, "--app", TASKS,
                                            "--name", name, *flags),
                                stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        read_line_matching(proc, rf"ZFABRIC-READY worker {name}", 60)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture(scope="module")
def routed() -> Iterator[tuple[Fabric, Workers, dict[str, int]]]:
    """One plain worker, and one with ``--tag gpu --resources gpu=2``: their pids by name."""
    fab = start_fabric(workers=1)
    extra = Workers(fab.address)
    try:
        gpu = extra.start("gpu-box", "--tag", "gpu", "--resources", "gpu=2,mem_gb=64")
        pids = {"plain": fab.workers()[0].pid, "gpu": gpu.pid}
        yield fab, extra, pids
    finally:
        extra.stop_all()
        fab.stop()


async def test_tagged_tasks_run_only_where_every_tag_is(routed: tuple[Fabric, Workers, dict[str, int]]) -> None:
    fab, _, pids = routed
    async with zfabric.Client(fab.address) as client:
        gpu_only = client.options(tags=["gpu"])
        tagged = [gpu_only.submit(f"{TASKS}:pid") for _ in range(300)]
        plain = [client.submit(f"{TASKS}:pid") for _ in range(300)]
        tagged_pids = Counter(await asyncio.gather(*tagged))
        plain_pids = Counter(await asyncio.gather(*plain))
        assert tagged_pids == {pids["gpu"]: 300}, f"tasks tagged gpu ran on {tagged_pids}, gpu-box is {pids['gpu']}"
        assert set(plain_pids) <= {pids["gpu"], pids["plain"]} and sum(plain_pids.values()) == 300
        # map takes the same options, and resources count too
        values = await client.options(tags=["gpu"], resources={"mem_gb": 8}).map(f"{TASKS}:apid", [0.0] * 50)
        assert values == [pids["gpu"]] * 50
        assert set(await asyncio.gather(*[client.options(resources={"mem_gb": 32}).submit(f"{TASKS}:pid")
                                          for _ in range(20)])) == {pids["gpu"]}


async def test_resources_bound_how_many_run_at_once(routed: tuple[Fabric, Workers, dict[str, int]]) -> None:
    fab, _, pids = routed
    async with zfabric.Client(fab.address) as client:
        one_gpu = client.options(resources={"gpu": 1})
        spans = await asyncio.gather(*[one_gpu.submit(f"{TASKS}:aspan", 0.3) for _ in range(6)])
        assert {pid for pid, _, _ in spans} == {pids["gpu"]}
        edges = sorted([(start, 1) for _, start, _ in spans] + [(end, -1) for _, _, end in spans])
        running = most = 0
        for _, step in edges:
            running += step
            most = max(most, running)
        assert most == 2, f"gpu=2 worker ran {most} tasks needing gpu=1 at once"
        # a task needing both units waits for them, and so never overlaps another gpu task
        spans = await asyncio.gather(client.options(resources={"gpu": 2}).submit(f"{TASKS}:aspan", 0.3),
                                     *[one_gpu.submit(f"{TASKS}:aspan", 0.3) for _ in range(2)])
        big = spans[0]
        assert all(end <= big[1] + 0.05 or start >= big[2] - 0.05 for _, start, end in spans[1:]), spans


async def test_a_task_no_worker_can_take_waits_and_status_says_why(
        routed: tuple[Fabric, Workers, dict[str, int]]) -> None:
    fab, extra, pids = routed
    async with zfabric.Client(fab.address) as client:
        handle = client.options(tags=["tpu"]).submit(f"{TASKS}:pid")
        too_big = client.options(resources={"gpu": 3}).submit(f"{TASKS}:pid")

        async def waiting() -> Any:
            status = await client.status()
            return len(status["waiting"]) == 2 and status["waiting"]
        shown = await async_wait_for(waiting, 10, "status to show both tasks waiting")
        assert {(tuple(w["tags"]), json.dumps(w["resources"]), w["queued"], w["workers"]) for w in shown} == \
            {(("tpu",), "{}", 1, 0), ((), '{"gpu": 3}', 1, 0)}
        text = subprocess.run(zfabric_cmd("status", fab.address), capture_output=True, text=True, timeout=30).stdout
        assert "waiting: 1 tasks for tags tpu (no live worker has tags tpu)" in text, text
        assert "waiting: 1 tasks for resources gpu=3 (no live worker has resources gpu=3)" in text, text
        assert "tags gpu and resources gpu=2, mem_gb=64" in text, text
        assert not handle.done() and not too_big.done()
        tpu = extra.start("tpu-box", "--tag", "tpu")
        assert await asyncio.wait_for(handle, 20) == tpu.pid
        assert not too_big.done()
        too_big.cancel()
        tpu.kill()


async def test_a_killed_tagged_worker_s_tasks_wait_for_another_with_the_tag(
        routed: tuple[Fabric, Workers, dict[str, int]]) -> None:
    """SIGKILL the only worker with a tag mid-run: its tasks are neither failed nor sent to other workers;
    they run on the next worker with the tag, each result arriving once."""
    fab, extra, pids = routed
    first = extra.start("eu-1", "--tag", "eu", "--concurrency", "4")
    async with zfabric.Client(fab.address) as client:
        handles = [client.options(tags=["eu"]).submit(f"{TASKS}:asleep_pid", 0.2, i) for i in range(24)]
        await async_wait_for(lambda: sum(h.done() for h in handles) >= 4, 20, "a few eu tasks to finish")
        first.kill()
        first.wait(10)

        async def requeued() -> bool:
            status = await client.status()
            return any(w["tags"] == ["eu"] and w["workers"] == 0 for w in status["waiting"])
        await async_wait_for(requeued, 15, "the killed worker's tasks to wait for a worker tagged eu")
        assert not all(h.done() for h in handles)
        second = extra.start("eu-2", "--tag", "eu")
        results = await asyncio.wait_for(asyncio.gather(*handles), 30)
        assert sorted(value for value, _ in results) == list(range(24)), "a task was lost or ran twice"
        assert {pid for _, pid in results} <= {first.pid, second.pid}, "an eu task ran on a worker without the tag"
        assert any(pid == second.pid for _, pid in results)
        second.kill()


async def test_bad_routing_options_fail_at_once_with_what_to_do(routed: tuple[Fabric, Workers, dict[str, int]]) -> None:
    fab, _, _ = routed
    async with zfabric.Client(fab.address) as client:
        with pytest.raises(zfabric.ConfigError, match=r"tags must be a list of strings, e.g. tags=\['gpu'\]"):
            client.options(tags="gpu")
        with pytest.raises(zfabric.ConfigError, match=r"resources: gpu must be a number from 1e-06 to 1e\+15"):
            client.options(resources={"gpu": -1})
        with pytest.raises(zfabric.ConfigError, match="resources must be a dict"):
            client.options(resources=["gpu"])
        assert await client.submit(f"{TASKS}:add", 1, 2) == 3  # and the client is still fine
    out = subprocess.run(zfabric_cmd("worker", fab.address, "--resources", "gpu"), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "'gpu' is not NAME=AMOUNT" in out.stderr, out.stderr
    out = subprocess.run(zfabric_cmd("worker", fab.address, "--tag", "a,b"), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "no commas" in out.stderr, out.stderr


# ---- the scheduler's state machine, fed what no honest peer sends ------------------------------------

def _state() -> SchedulerState:
    return SchedulerState(SchedulerConfig(), 1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("slot", [
    [0, "gpu", {}], [0, [1], {}], [0, [], {"gpu": "1"}], [0, [], {"gpu": 0}], [0, [], {"gpu": float("nan")}],
    [0, ["x" * 65], {}], [0, ["a,b"], {}], [0, [], {"": 1}], [0, [f"t{i}" for i in range(17)], {}],
    [True, [], {}], [0, []], [0, [], {}, 1], {"tags": []}, "gpu", 1.5, None])
def test_a_malformed_placement_is_rejected_alone(slot: Any) -> None:
    state = _state()
    malformed = state.submit(b"c" * 16, "tcp://127.0.0.1:1", "", [1, slot, b"call", 2, [0, ["gpu"], {}], b"call"],
                             0.0)
    assert malformed == 1
    assert list(state.tasks) == [2], "the good entry beside it was not kept"
    state.validate()


@pytest.mark.timeout(30)
def test_routes_held_at_once_are_bounded_per_client_and_in_all() -> None:
    from zfabric.scheduling import MAX_ROUTES, MAX_ROUTES_PER_CLIENT
    state = _state()
    task_id = 0

    def submit(cid: bytes, n: int, prefix: str) -> None:
        nonlocal task_id
        flat: list[Any] = []
        for i in range(n):
            task_id += 1
            flat += (task_id, [0, [f"{prefix}{i}"], {}], b"call")
        state.submit(cid, f"tcp://127.0.0.1:{1000 + cid[0]}", "", flat, 0.0)

    submit(b"a" * 16, MAX_ROUTES_PER_CLIENT + 5, "a")
    assert len(state.routes) == MAX_ROUTES_PER_CLIENT, "one client took more than its share of routes"
    assert any(b"this client has tasks of" in f for where, _, f in state.outbox if where == "client")
    for c in range(MAX_ROUTES // MAX_ROUTES_PER_CLIENT + 2):
        submit(bytes([c + 66]) * 16, MAX_ROUTES_PER_CLIENT, f"c{c}-")
    assert len(state.routes) == MAX_ROUTES
    assert any(b"the scheduler holds tasks of" in f for where, _, f in state.outbox if where == "client")
    state.cancel(b"a" * 16, [1], 0.0)  # a route's last task gone: it makes room for another
    before = len(state.tasks)
    submit(b"z" * 16, 1, "new")
    assert len(state.tasks) == before + 1 and len(state.routes) <= MAX_ROUTES
    state.validate()


@pytest.mark.timeout(30)
def test_a_worker_hello_with_malformed_tags_registers_it_with_none() -> None:
    state = _state()
    problem = state.worker_hello(b"w", "w", 1, 4, [], 1, "h", 0.0, ["ok", 7], {"gpu": 2})
    assert "is not a tag" in problem
    assert state.workers[b"w"].equipment.tags == frozenset() and state.workers[b"w"].equipment.resources == {}
    state.submit(b"c" * 16, "tcp://127.0.0.1:1", "", [1, [0, ["ok"], {}], b"call"], 0.0)
    state.dispatch()
    assert state.tasks[1].worker is None, "a task went to a worker whose tags were refused"
    assert state.status()["waiting"][0]["workers"] == 0
    state.validate()


@pytest.mark.timeout(30)
def test_float_resources_add_up_without_drift() -> None:
    equipment = Equipment(frozenset(), {"gpu": 0.3})
    route = make_route([], {"gpu": 0.1})
    assert route is not None
    for _ in range(3):
        assert equipment.fits(route) >= 1
        equipment.hold(route)
    assert equipment.fits(route) == 0
    for _ in range(3):
        equipment.hold(route, -1)
    assert equipment.used == {}
    assert parse_resources_spec("gpu=2, mem_gb=0.5") == {"gpu": 2, "mem_gb": 0.5}
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_resources_spec("gpu=x")


# ---- found by a hostile review (each failed before its fix) ------------------------------------------

GPU = make_route(["gpu"], {"gpu": 1})
CID, CSINK = b"client-secret-a!", "tcp://127.0.0.1:9001"


def _submit(state: SchedulerState, ids: list[int], route: Any, now: float = 0.0) -> None:
    state.submit(CID, CSINK, "", [x for i in ids for x in (i, placement(0, route), b"call")], now)
    state.dispatch()


def _waits_with_room(state: SchedulerState, wid: bytes) -> bool:
    worker, queue = state.workers[wid], state.routes[GPU].queue
    return bool(queue.n_ready and worker.free and worker.equipment.fits(GPU))


@pytest.mark.timeout(30)
def test_a_route_that_emptied_while_blocked_is_served_when_tasks_come_again() -> None:
    state = _state()
    for wid in (b"W", b"W2"):
        state.worker_hello(wid, "w", 1, 4, [], 1, "h", 0.0, ["gpu"], {"gpu": 1})
    _submit(state, [1, 2, 5], GPU)  # 5 waits: both workers hold their one gpu
    state.cancel(CID, [5], 0.1)  # nothing ready now, the route still marked blocked
    state.worker_done(b"W", 1, 1, 1, [1], 0, [], 0.2)  # W has room again
    _submit(state, [3], GPU, now=0.3)
    state.tick(0.4)
    assert not _waits_with_room(state, b"W"), "a task waits while W could run it"
    state.validate()


@pytest.mark.timeout(30)
def test_a_retry_after_its_back_off_is_served_and_a_cancelled_retry_frees_its_resources() -> None:
    state = _state()
    state.worker_hello(b"W", "w", 1, 4, [], 1, "h", 0.0, ["gpu"], {"gpu": 1})
    _submit(state, [1], GPU)
    state.cancel(CID, [1], 0.1)  # a sync task the worker cannot withdraw: the gpu stays held...
    assert state.workers[b"W"].equipment.used
    state.worker_done(b"W", 1, 1, 1, [], 0, [1, 0.5], 0.2)  # ...until it reports it (here as a retry)
    assert state.workers[b"W"].equipment.used == {} and not state.workers[b"W"].releasing
    _submit(state, [2, 3], GPU, now=0.3)
    state.worker_done(b"W", 1, 2, 0, [], 0, [2, 0.5], 0.4)  # 2 retries after 0.5 s; 3 waits for the gpu
    state.tick(1.0)
    assert not _waits_with_room(state, b"W")
    state.validate()


@pytest.mark.timeout(30)
def test_suspects_of_a_route_do_not_block_its_ready_tasks() -> None:
    state = SchedulerState(SchedulerConfig(max_deaths=2), 1)
    state.worker_hello(b"dies", "w", 1, 4, [], 1, "h", 0.0, ["gpu"], {"gpu": 8})
    _submit(state, [1, 2], GPU)
    state.worker_lost(b"dies", "killed")  # 1 and 2 become suspects: one per worker at a time
    state.worker_hello(b"W", "w", 1, 10, [], 1, "h", 0.0, ["gpu"], {"gpu": 8})
    _submit(state, [10, 11, 12], GPU)
    assert not _waits_with_room(state, b"W"), "ready tasks wait behind a suspect"
    state.validate()


@pytest.mark.timeout(30)
def test_resource_amounts_add_up_exactly_in_any_order() -> None:
    state = _state()
    state.worker_hello(b"W", "w", 1, 4, [], 1, "h", 0.0, [], {"mem": 64e9})
    needs = {1: 3635783448, 2: 0.3, 3: 31059801852}
    for task_id, need in needs.items():
        _submit(state, [task_id], make_route([], {"mem": need}))
    for seq, task_id in enumerate([3, 1, 2], 1):
        state.worker_done(b"W", 1, seq, 1, [task_id], 0, [], 0.1)
    assert state.workers[b"W"].equipment.used == {}  # floats left 3e-6 here
    state.validate()


@pytest.mark.timeout(60)
def test_routed_dispatch_does_not_cost_more_with_more_workers() -> None:
    """A trickle of routed tasks, each finished at once: the work per
    task counted in `Equipment.fits` calls (a clock would measure the machine's mood)."""
    calls = {"n": 0}
    fits = Equipment.fits

    def counted(self: Equipment, route: Any) -> int:
        calls["n"] += 1
        return fits(self, route)

    def trickle(n_workers: int) -> int:
        state = _state()
        for i in range(n_workers):
            state.worker_hello(b"w%d" % i, "w", 1, 8, [], 1, "h", 0.0, ["gpu"], {"gpu": 8})
        calls["n"] = 0
        for i in range(200):
            _submit(state, [i + 1], GPU)
            (wid, ids), = [(d, m.groups[0][1][0::3]) for w, d, f in state.outbox if w == "worker"
                           for kind, m in [decode(f)] if kind == Kind.DISPATCH]
            state.outbox.clear()
            state.worker_done(wid, 1, state.workers[wid].done_seq + 1, 1, ids, 0, [], 0.0)
            state.outbox.clear()
        return calls["n"]

    Equipment.fits = counted  # type: ignore[method-assign]
    try:
        few, many = trickle(10), trickle(1000)
    finally:
        Equipment.fits = fits  # type: ignore[method-assign]
    assert many <= 2 * few + 200, f"{few} fits() calls with 10 workers, {many} with 1000"
