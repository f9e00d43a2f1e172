"""Fault tolerance (SPEC §2, issue 3): real processes killed, stopped and restarted mid-run.

Every test counts every result:

- lost: a handle never resolved, or resolved with an error (a `FabricError`);
- wrong: a value that does not match its input;
- visible duplicates: a handle resolved twice (counted by wrapping `Handle._finish`),
  a handle whose value changed after it resolved, or results not matching inputs one to one.

The scheduler and workers run as separate `python -m zfabric ...` processes so a test can
SIGKILL / SIGSTOP / SIGTERM exactly the one it means; every process a test starts is
SIGKILLed at teardown if it is still there. Measured figures are printed as `FAULTS ...`
lines (run with `-s` to see them).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

import zfabric
from zfabric import demo_tasks
from zfabric.handle import Handle
from conftest import ROOT, TASKS, Fabric, async_wait_for, read_line_matching, zfabric_cmd, free_port_pair

LOOPBACK = "127.0.0.1"
READY = r"^ZFABRIC-READY (.*)$"


# ---- helpers --------------------------------------------------------------------------------------------


def figures(test: str, **values: Any) -> None:
    """One line of measured figures for the report."""
    text = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\nFAULTS {test}: {text}", flush=True)


class Procs:
    """Every process a test starts; stderr of each goes to a log file in the test's tmp dir."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[subprocess.Popen[str]] = []
        self.logs: dict[int, Path] = {}
        self._seq = 0

    def spawn(self, argv: list[str], name: str, stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[str]:
        self._seq += 1
        path = self.logdir / f"{self._seq:02d}-{name}.log"
        with open(path, "w") as log:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                                    start_new_session=True)
        self.started.append(proc)
        self.logs[proc.pid] = path
        return proc

    async def ready(self, proc: subprocess.Popen[str], timeout: float = 60) -> str:
        """Wait (off the event loop) for the process's ZFABRIC-READY line."""
        try:
            m = await asyncio.to_thread(read_line_matching, proc, READY, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- its log:\n{self.log_tail(proc)}") from None
        return m.group(1)

    async def scheduler(self, address: str, *extra: str) -> subprocess.Popen[str]:
        proc = self.spawn(zfabric_cmd("--log-level", "warning", "scheduler", "--bind", address, *extra), "scheduler")
        text = await self.ready(proc)
        assert address in text, text
        return proc

    def worker(self, address: str, *extra: str) -> subprocess.Popen[str]:
        return self.spawn(zfabric_cmd("--log-level", "warning", "worker", address, "--app", TASKS, *extra), "worker")

    async def workers(self, address: str, n: int, *extra: str) -> list[subprocess.Popen[str]]:
        started = [self.worker(address, *extra) for _ in range(n)]
        await asyncio.gather(*(self.ready(p) for p in started))
        return started

    def client_script(self, address: str, fn: str, n: int, args: list[Any]) -> subprocess.Popen[str]:
        """A separate client process: submits `n` tasks fn(*args) and prints SUBMITTED.

        Then it waits until a line with a number of seconds S arrives on its stdin (forever if none does),
        waits up to S s for every handle to resolve, and prints `RESULT done=.. ok=.. duplicates=..`.
        """
        script = self.logdir / "zf_fault_client.py"
        script.write_text(textwrap.dedent("""
            import asyncio, json, sys, time
            import zfabric

            async def main(address, fn, n, args):
                async with zfabric.Client(address, timeout_s=120) as client:
                    handles = [client.submit(fn, *args) for _ in range(n)]
                    print("SUBMITTED", len(handles), flush=True)
                    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                    if not line.strip():
                        await asyncio.Event().wait()
                    deadline = time.monotonic() + float(line)
                    while time.monotonic() < deadline and not all(h.done() for h in handles):
                        await asyncio.sleep(0.05)  # sync-ok: polling interval of a deadline wait
                    done = sum(h.done() for h in handles)
                    ok = sum(1 for h in handles if h.done() and h.exception() is None)
                    print(f"RESULT done={done} ok={ok} duplicates={client.duplicates}", flush=True)

            asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])))
        """))
        return self.spawn([sys.executable, str(script), address, fn, str(n), json.dumps(args)], "client",
                          stdin=subprocess.PIPE)

    def log_tail(self, proc: subprocess.Popen[str], lines: int = 30) -> str:
        path = self.logs.get(proc.pid)
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    proc.kill()  # SIGKILL also ends a SIGSTOPped process
                except ProcessLookupError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (proc.stdin, proc.stdout):
                if pipe:
                    pipe.close()
        for proc in self.started:  # show what went wrong inside the processes, if anything
            tail = self.log_tail(proc, 200)
            bad = [line for line in tail.splitlines() if "Traceback" in line or " ERROR " in line]
            if bad:
                print(f"\n--- {self.logs[proc.pid].name} (pid {proc.pid}) logged errors:\n" + "\n".join(bad[-10:]))


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.cleanup()


@pytest.fixture
def resolutions(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """How many times each handle (by id) was resolved in this process."""
    counts: Counter[int] = Counter()
    original = Handle._finish

    def counting(self: Handle, value: Any, error: BaseException | None) -> None:
        counts[self.id] += 1
        original(self, value, error)

    monkeypatch.setattr(Handle, "_finish", counting)
    return counts


def _first(value: Any) -> Any:
    return value[0]


class Tally:
    """Handles with the value each must produce; `key` maps a result to what is compared."""

    def __init__(self, resolutions: Counter[int], key: Callable[[Any], Any] = lambda v: v) -> None:
        self.resolutions = resolutions
        self.key = key
        self.items: list[tuple[Handle, Any]] = []
        self.first: dict[int, tuple[Any, str | None]] = {}
        self.done = 0
        self.done_at: dict[int, float] = {}

    def add(self, handle: Handle, expected: Any) -> Handle:
        self.items.append((handle, expected))
        handle.add_done_callback(self._on_done)
        return handle

    @property
    def outstanding(self) -> int:
        return len(self.items) - self.done

    def _on_done(self, handle: Handle) -> None:
        self.done += 1
        self.done_at[handle.id] = time.monotonic()
        self.first[handle.id] = self._outcome(handle)

    @staticmethod
    def _outcome(handle: Handle) -> tuple[Any, str | None]:
        exc = handle.exception()
        if exc is not None:
            return None, f"{type(exc).__name__}: {exc}"
        return handle.result(), None

    def count(self) -> dict[str, Any]:
        lost = wrong = dup = 0
        errors: Counter[str] = Counter()
        ids = Counter(h.id for h, _ in self.items)
        dup += sum(n - 1 for n in ids.values() if n > 1)
        for handle, expected in self.items:
            if self.resolutions[handle.id] > 1:
                dup += 1
            if not handle.done():
                lost += 1
                continue
            value, error = self._outcome(handle)
            if (value, error) != self.first.get(handle.id):
                dup += 1  # the handle changed its outcome after it resolved
            if error is not None:
                lost += 1
                errors[error.split(":")[0]] += 1
            elif self.key(value) != expected:
                wrong += 1
        return {"tasks": len(self.items), "lost": lost, "wrong": wrong, "visible_duplicates": dup,
                "errors": dict(errors)}

    def pids(self) -> Counter[int]:
        """How many results each worker pid produced (for results shaped [value, pid])."""
        return Counter(h.result()[1] for h, _ in self.items if h.done() and h.exception() is None)


async def status(client: zfabric.Client, timeout_s: float = 5.0) -> dict[str, Any] | None:
    try:
        return await client.status(timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return None


def rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def assert_clean(counts: dict[str, Any]) -> None:
    assert counts["lost"] == 0, counts
    assert counts["wrong"] == 0, counts
    assert counts["visible_duplicates"] == 0, counts


# ---- 1. SIGKILL one worker of four mid-run ------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sigkill_one_of_four_workers_at_30_percent(procs: Procs, resolutions: Counter[int]) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    await procs.scheduler(address)
    # 4 x 20 slots of 20 ms tasks: at most ~4,000 tasks/s, so the workers (not this client) set the pace
    # and every worker holds tasks until the end.
    workers = await procs.workers(address, 4, "--concurrency", "20")
    n = 10_000
    async with zfabric.Client(address, timeout_s=60) as client:
        tally = Tally(resolutions, key=_first)
        started = time.monotonic()
        for i in range(n):
            tally.add(client.submit(demo_tasks.asleep_pid, 0.02, i), i)
        await async_wait_for(lambda: tally.done >= n * 3 // 10, 30, "30% of the tasks to finish")
        victim = random.choice(workers)
        victim.kill()
        killed = time.monotonic()
        done_at_kill = tally.done
        victim.wait(10)

        async def redelivered() -> dict[str, Any] | None:
            st = await status(client, 2.0)
            return st if st is not None and st["redelivered"] > 0 else None

        st = await async_wait_for(redelivered, 20, "the scheduler to redeliver the killed worker's tasks")
        t_redelivered = time.monotonic() - killed
        await async_wait_for(lambda: tally.done == n, 60, "every task to finish")
        t_all = time.monotonic() - killed
        counts = tally.count()
        pids = tally.pids()
        after_kill = [h for h, _ in tally.items
                      if tally.done_at[h.id] > killed + 0.05 and h.exception() is None and h.result()[1] == victim.pid]
        st = await status(client) or st
        figures("sigkill_1_of_4", **counts, duplicates_dropped=client.duplicates, done_at_kill=done_at_kill,
                redelivered=st["redelivered"], kill_to_redelivered_s=t_redelivered, kill_to_all_done_s=t_all,
                whole_run_s=time.monotonic() - started, victim_results=pids[victim.pid],
                victim_results_after_kill=len(after_kill))
        assert_clean(counts)
        assert st["redelivered"] >= 1
        assert sorted(pids) == sorted(p.pid for p in workers)  # every worker ran some
        assert not after_kill


# ---- 2. chaos: a random worker SIGKILLed every second ---------------------------------------------------


@pytest.mark.timeout(90)
async def test_chaos_kill_and_respawn_a_random_worker_every_second(procs: Procs,
                                                                   resolutions: Counter[int]) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    await procs.scheduler(address)
    extra = ("--concurrency", "200")
    first = await procs.workers(address, 3, *extra)
    ready: dict[subprocess.Popen[str], asyncio.Future[str]] = {}  # done once the worker announced itself
    for p in first:
        ready[p] = asyncio.get_running_loop().create_future()
        ready[p].set_result("ready")
    rng = random.Random()
    async with zfabric.Client(address, timeout_s=60) as client:
        tally = Tally(resolutions, key=_first)
        stop = asyncio.Event()

        async def produce() -> None:
            i = 0
            while not stop.is_set():
                while tally.outstanding < 2000:
                    tally.add(client.submit(demo_tasks.asleep_pid, 0.01, i), i)
                    i += 1
                await async_wait_for(lambda: tally.outstanding < 1000 or stop.is_set(), 60,
                                     "the stream to make progress")

        producer = asyncio.create_task(produce())
        kills = []
        for _ in range(10):
            await asyncio.sleep(1.0)  # sync-ok: the chaos cadence, one kill a second
            await async_wait_for(lambda: any(t.done() and p.poll() is None for p, t in ready.items()), 30,
                                 "a registered worker to kill")
            victim = rng.choice([p for p, t in ready.items() if t.done() and p.poll() is None])
            victim.kill()
            kills.append(victim.pid)
            del ready[victim]
            replacement = procs.worker(address, *extra)
            ready[replacement] = asyncio.ensure_future(procs.ready(replacement))
            victim.wait(10)
            assert producer.done() is False or producer.exception() is None
        stop.set()
        await producer
        await async_wait_for(lambda: tally.done == len(tally.items), 60, "every streamed task to finish")
        await asyncio.gather(*ready.values())
        st = await status(client)
        counts = tally.count()
        figures("chaos", **counts, kills=len(kills), duplicates_dropped=client.duplicates,
                redelivered=st and st["redelivered"], scheduler_lost=st and st["lost"],
                scheduler_duplicates=st and st["duplicates"])
        assert_clean(counts)
        assert len(kills) == 10


@pytest.mark.timeout(90)
async def test_chaos_with_sync_tasks_at_default_concurrency_fails_no_innocent_task(
        procs: Procs, resolutions: Counter[int]) -> None:
    """Finding 2: 3 workers at default concurrency, 600 x 0.02 s sync tasks a round, a random worker
    SIGKILLed (and replaced) every second for 10 rounds. Many tasks share every dying worker; none of them
    may fail with WorkerLost, because a shared death is no evidence against any one task."""
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    await procs.scheduler(address)
    live = list(await procs.workers(address, 3))
    rng = random.Random()
    async with zfabric.Client(address, timeout_s=80) as client:
        tally = Tally(resolutions, key=_first)
        kills = 0
        for round_no in range(10):
            for i in range(600):
                n = round_no * 600 + i
                tally.add(client.submit(demo_tasks.slow_pid, 0.02, n), n)
            await asyncio.sleep(1.0)  # sync-ok: the chaos cadence, one kill a second
            victim = rng.choice([p for p in live if p.poll() is None])
            victim.kill()
            kills += 1
            live.remove(victim)
            live.append(procs.worker(address))
            victim.wait(10)
        await async_wait_for(lambda: tally.done == len(tally.items), 75, "every task to finish")
        counts = tally.count()
        st = await status(client)
        figures("chaos_sync", **counts, kills=kills, redelivered=st and st["redelivered"],
                scheduler_lost=st and st["lost"], suspects=st and st["suspects"])
        assert_clean(counts)
        assert st is None or st["lost"] == 0, st


# ---- 3. SIGKILL the scheduler and start it again on the same address -----------------------------------


@pytest.mark.timeout(60)
async def test_scheduler_sigkill_and_restart_loses_nothing(procs: Procs, resolutions: Counter[int]) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    sched = await procs.scheduler(address)
    await procs.workers(address, 2, "--concurrency", "100")
    n = 1000
    async with zfabric.Client(address, timeout_s=60) as client:
        first_epoch = client.epoch
        tally = Tally(resolutions, key=_first)
        for i in range(n):
            tally.add(client.submit(demo_tasks.asleep_pid, 0.5, i), i)

        async def all_held() -> bool:
            st = await status(client, 2.0)
            return st is not None and st["running"] == 200 and st["queued"] + st["running"] + st["done"] == n

        await async_wait_for(all_held, 20, "1,000 tasks in the scheduler, 200 running")
        sched.kill()
        killed = time.monotonic()
        done_at_kill = tally.done
        sched.wait(10)
        await procs.scheduler(address)
        t_restarted = time.monotonic() - killed
        await async_wait_for(lambda: tally.done == n, 45, "every task to finish after the restart")
        t_all = time.monotonic() - killed
        st = await status(client)
        counts = tally.count()
        figures("scheduler_restart", **counts, done_at_kill=done_at_kill, kill_to_restarted_s=t_restarted,
                kill_to_all_done_s=t_all, duplicates_dropped=client.duplicates,
                new_scheduler_submitted=st and st["submitted"], new_scheduler_workers=st and len(st["workers"]))
        assert_clean(counts)
        assert client.epoch != first_epoch
        assert st is not None and st["epoch"] == client.epoch


# ---- 4. SIGSTOP a worker for 5 s, then SIGCONT ----------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sigstopped_worker_tasks_run_elsewhere_and_its_late_results_are_dropped(
        procs: Procs, resolutions: Counter[int]) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    await procs.scheduler(address)
    stopped, other = await procs.workers(address, 2, "--concurrency", "50")
    n = 300
    async with zfabric.Client(address, timeout_s=60) as client:
        tally = Tally(resolutions, key=_first)
        for i in range(n):
            tally.add(client.submit(demo_tasks.asleep_pid, 0.3, i), i)

        async def holds_tasks() -> bool:
            st = await status(client, 2.0)
            return st is not None and any(w["pid"] == stopped.pid and w["running"] > 0 for w in st["workers"])

        await async_wait_for(holds_tasks, 20, "the worker to hold tasks")
        stopped.send_signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            async def redelivered() -> dict[str, Any] | None:
                st = await status(client, 2.0)
                return st if st is not None and st["redelivered"] > 0 else None

            st = await async_wait_for(redelivered, 5.0, "the stopped worker's tasks to be redelivered")
            redelivered_s = time.monotonic() - t_stop
            held = st["redelivered"]
            remaining = 5.0 - (time.monotonic() - t_stop)
            if remaining > 0:
                try:
                    await async_wait_for(lambda: tally.done == n, remaining, "every task (before SIGCONT)")
                except AssertionError:
                    pass  # checked after SIGCONT, with a margin
            all_done_s = time.monotonic() - t_stop if tally.done == n else None
            dup_before = client.duplicates
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - t_stop)))  # sync-ok: stay stopped for 5 s
        finally:
            stopped.send_signal(signal.SIGCONT)
        t_cont = time.monotonic()
        await async_wait_for(lambda: tally.done == n, 3.0, "every task to finish (SIGCONT + 3 s at the latest)")
        values_before = {h.id: h.result() for h, _ in tally.items}
        await async_wait_for(lambda: client.duplicates > dup_before, 20,
                             "the stopped worker's late results to arrive and be dropped")
        late_s = time.monotonic() - t_cont

        async def reregistered() -> bool:
            st = await status(client, 2.0)
            return st is not None and any(w["pid"] == stopped.pid for w in st["workers"])

        await async_wait_for(reregistered, 20, "the stopped worker to re-register")
        reregistered_s = time.monotonic() - t_cont
        # a result from the stopped worker that resolved a handle after it was stopped would mean its
        # tasks did not run elsewhere (0.5 s: results already on their way when it stopped)
        late_wins = [h.id for h, _ in tally.items if h.result()[1] == stopped.pid and tally.done_at[h.id] > t_stop + 0.5]
        counts = tally.count()
        figures("sigstop_5s", **counts, stop_to_redelivered_s=redelivered_s, redelivered=held,
                stop_to_all_done_s=all_done_s if all_done_s is not None else "after-SIGCONT",
                duplicates_dropped=client.duplicates, cont_to_late_results_s=late_s,
                cont_to_reregistered_s=reregistered_s, late_results_that_won=len(late_wins))
        assert_clean(counts)
        assert not late_wins, f"{len(late_wins)} handles were resolved by the stopped worker after SIGCONT"
        assert {h.id: h.result() for h, _ in tally.items} == values_before  # no handle changed its value
        assert stopped.poll() is None and other.poll() is None


# ---- 5. a client SIGKILLed mid-run ----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_killed_client_is_forgotten_within_its_timeout(procs: Procs, resolutions: Counter[int]) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    client_timeout = 2.0
    sched = await procs.scheduler(address, "--client-timeout-s", str(client_timeout))
    concurrency = 100
    await procs.workers(address, 1, "--concurrency", str(concurrency))
    n = 5000
    async with zfabric.Client(address, timeout_s=60) as observer:
        await observer.status()  # the scheduler's reply socket to the observer exists now
        fds_before = psutil.Process(sched.pid).num_fds()
        child = procs.client_script(address, f"{TASKS}:asleep", n, [3.0])
        await asyncio.to_thread(read_line_matching, child, r"^SUBMITTED", 60)

        async def child_running() -> dict[str, Any] | None:
            st = await status(observer, 2.0)
            ok = st is not None and st["clients"] == 2 and st["submitted"] >= n and st["running"] > 0 \
                and st["queued"] > 0
            return st if ok else None

        held = await async_wait_for(child_running, 30, "the child client's tasks queued and running")
        child.kill()
        killed = time.monotonic()
        child.wait(10)

        async def forgotten() -> dict[str, Any] | None:
            st = await status(observer, 2.0)
            ok = st is not None and st["clients"] == 1 and st["queued"] == 0 and st["running"] == 0
            return st if ok else None

        st = await async_wait_for(forgotten, client_timeout + 15, "the scheduler to forget the killed client")
        forgot_s = time.monotonic() - killed

        async def slots_back() -> bool:
            s = await status(observer, 2.0)
            return s is not None and sum(w["free"] for w in s["workers"]) == concurrency

        await async_wait_for(slots_back, 15, "the worker's slots to come back")
        fds = psutil.Process(sched.pid).num_fds
        await async_wait_for(lambda: fds() <= fds_before, 15,
                             "the scheduler's file descriptors to return to their count before the client came")
        tally = Tally(resolutions)
        for i in range(200):
            tally.add(observer.submit(demo_tasks.inc, i), i + 1)
        await async_wait_for(lambda: tally.done == 200, 30, "another client's tasks to complete")
        counts = tally.count()
        figures("client_killed", queued_at_kill=held["queued"], running_at_kill=held["running"],
                kill_to_forgotten_s=forgot_s, client_timeout_s=client_timeout, cancelled=st["cancelled"],
                observer_tasks=counts["tasks"], observer_lost=counts["lost"], scheduler_fds_before=fds_before,
                scheduler_fds_after=fds())
        assert forgot_s < client_timeout + 4.0, forgot_s
        assert_clean(counts)


# ---- 6. a sink that stops reading -----------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_stopped_sink_keeps_every_process_bounded_and_responsive(procs: Procs,
                                                                       resolutions: Counter[int]) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    sched = await procs.scheduler(address, "--client-timeout-s", "120")
    workers = await procs.workers(address, 2)
    n, size = 20_000, 10_000
    bound = 300 * 1024 * 1024
    async with zfabric.Client(address, timeout_s=60) as observer:
        warm = Tally(resolutions)
        for i in range(100):
            warm.add(observer.submit(demo_tasks.inc, i), i + 1)
        await async_wait_for(lambda: warm.done == 100, 30, "warm-up tasks")
        pids = {"scheduler": sched.pid, **{f"worker{i + 1}": w.pid for i, w in enumerate(workers)}}
        baseline = {name: rss(pid) for name, pid in pids.items()}
        peak = dict(baseline)

        def sample() -> None:
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss(pid))

        child = procs.client_script(address, f"{TASKS}:ablob", n, [size, 2.0])
        await asyncio.to_thread(read_line_matching, child, r"^SUBMITTED", 60)

        async def all_accepted() -> bool:
            st = await status(observer, 2.0)
            return st is not None and st["submitted"] >= n + 100

        await async_wait_for(all_accepted, 30, "the child's 20,000 tasks accepted")
        child.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()

        async def all_produced() -> dict[str, Any] | None:
            sample()
            st = await status(observer, 5.0)
            return st if st is not None and st["done"] >= n + 100 else None

        st = await async_wait_for(all_produced, 60, "the workers to produce every result for the stopped sink")
        produced_s = time.monotonic() - stopped
        tally = Tally(resolutions)
        t0 = time.monotonic()
        for i in range(500):
            tally.add(observer.submit(demo_tasks.inc, i), i + 1)

        def sampled_done() -> bool:
            sample()
            return tally.done == 500

        await async_wait_for(sampled_done, 30, "another client's tasks to complete while the sink is stopped")
        other_s = time.monotonic() - t0
        sample()
        grown = {name: peak[name] - baseline[name] for name in pids}
        alive = {name: psutil.pid_exists(pid) for name, pid in pids.items()}
        child.kill()
        child.wait(10)
        counts = tally.count()
        figures("stopped_sink", results_mb=n * size / 1e6, stop_to_all_produced_s=produced_s,
                other_client_500_tasks_s=other_s,
                **{f"{name}_grew_mb": round(g / 1e6, 1) for name, g in grown.items()},
                **{f"{name}_baseline_mb": round(b / 1e6, 1) for name, b in baseline.items()},
                dropped_to_clients=st.get("dropped_to_clients"))
        assert_clean(counts)
        assert all(alive.values()), alive
        for name, g in grown.items():
            assert g < bound, f"{name} grew by {g / 1e6:.0f} MB (bound {bound / 1e6:.0f} MB)"


# ---- 7. a poison task -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_poison_task_fails_after_killing_three_workers_and_others_complete(
        own_fabric: Callable[..., Fabric], resolutions: Counter[int]) -> None:
    fab = own_fabric(workers=2)
    async with zfabric.Client(fab.address, timeout_s=60) as client:
        tally = Tally(resolutions, key=_first)
        for i in range(250):
            tally.add(client.submit(demo_tasks.asleep_pid, 0.05, i), i)
        poison = client.submit(demo_tasks.crash, 1)
        for i in range(250, 500):
            tally.add(client.submit(demo_tasks.asleep_pid, 0.05, i), i)
        started = time.monotonic()
        await async_wait_for(lambda: poison.done() and tally.done == 500, 45,
                             "the poison task to fail and the others to finish")
        poison_error = poison.exception()
        counts = tally.count()
        st = await status(client)
        figures("poison", **counts, poison=type(poison_error).__name__, seconds=time.monotonic() - started,
                scheduler_lost=st and st["lost"], redelivered=st and st["redelivered"])
        assert isinstance(poison_error, zfabric.WorkerLost), poison_error
        assert isinstance(poison_error, zfabric.TaskError)
        # Two shared deaths make it a suspect; isolated in a child process it kills only that child.
        assert "killed the process running it" in str(poison_error), str(poison_error)
        assert_clean(counts)


# ---- 8. graceful drain on SIGTERM -----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sigterm_drains_a_worker_running_tasks_finish_queued_ones_move(
        procs: Procs, resolutions: Counter[int]) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    await procs.scheduler(address)
    grace = 20.0
    draining, other = await asyncio.gather(
        asyncio.create_task(_one_worker(procs, address, "--concurrency", "8", "--threads", "2",
                                        "--grace-s", str(grace))),
        asyncio.create_task(_one_worker(procs, address, "--concurrency", "8", "--threads", "8")))
    n, seconds = 16, 1.5
    async with zfabric.Client(address, timeout_s=60) as client:
        tally = Tally(resolutions, key=_first)
        for i in range(n):
            tally.add(client.submit(demo_tasks.slow_pid, seconds, i), i)

        async def both_full() -> bool:
            st = await status(client, 2.0)
            return st is not None and sorted(w["running"] for w in st["workers"]) == [8, 8]

        await async_wait_for(both_full, 20, "8 tasks on each worker")
        draining.send_signal(signal.SIGTERM)
        termed = time.monotonic()
        code = await asyncio.to_thread(draining.wait, grace + 20)
        exit_s = time.monotonic() - termed
        await async_wait_for(lambda: tally.done == n, 30, "every task to finish")
        all_s = time.monotonic() - termed
        st = await status(client)
        counts = tally.count()
        pids = tally.pids()
        figures("sigterm_drain", **counts, exit_code=code, term_to_exit_s=exit_s, term_to_all_done_s=all_s,
                ran_on_drained=pids[draining.pid], ran_on_other=pids[other.pid],
                redelivered=st and st["redelivered"])
        assert code == 0, procs.log_tail(draining)
        assert exit_s < grace, exit_s
        assert_clean(counts)
        assert pids[draining.pid] == 2, pids  # the two running in its threads finished there, nothing new started
        assert pids[other.pid] == n - 2, pids  # its own 8 and the 6 handed back
        assert st is not None and [w["pid"] for w in st["workers"]] == [other.pid]


async def _one_worker(procs: Procs, address: str, *extra: str) -> subprocess.Popen[str]:
    proc = procs.worker(address, *extra)
    await procs.ready(proc)
    return proc


# ---- 9 and 10: a client process that stalls (SIGSTOP) while its results are produced ---------------------


async def stall_client_until_all_produced(procs: Procs, observer: zfabric.Client, address: str, fn: str, n: int,
                                          args: list[Any]) -> subprocess.Popen[str]:
    """Start a client process submitting `n` tasks, SIGSTOP it once all are accepted, and return when the
    workers have produced every result (so they are buffered for, or dropped by, a sink nobody reads)."""
    child = procs.client_script(address, fn, n, args)
    await asyncio.to_thread(read_line_matching, child, r"^SUBMITTED", 60)

    async def counter_reached(key: str) -> bool:
        st = await status(observer, 5.0)
        return st is not None and st[key] >= n

    await async_wait_for(lambda: counter_reached("submitted"), 30, "the child's tasks accepted")
    child.send_signal(signal.SIGSTOP)  # alive, but its sink stops reading: a GC pause, a suspended laptop
    await async_wait_for(lambda: counter_reached("done"), 60, "the workers to produce every result")
    return child


async def resume_and_count(child: subprocess.Popen[str]) -> tuple[int, int, int]:
    """SIGCONT the client and let it wait up to 8 s for its results: (done, ok, duplicates dropped)."""
    child.send_signal(signal.SIGCONT)
    assert child.stdin is not None
    child.stdin.write("8\n")
    child.stdin.flush()
    m = await asyncio.to_thread(read_line_matching, child, r"^RESULT done=(\d+) ok=(\d+) duplicates=(\d+)", 60)
    done, ok, dups = (int(x) for x in m.groups())
    return done, ok, dups


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_worker_leaving_with_results_buffered_for_a_stalled_client_loses_nothing(
        procs: Procs, how: str) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    await procs.scheduler(address, "--client-timeout-s", "120")
    leaving, staying = await procs.workers(address, 2, "--grace-s", "5")
    n = 10_000
    async with zfabric.Client(address, timeout_s=60) as observer:
        child = await stall_client_until_all_produced(procs, observer, address, f"{TASKS}:ablob", n, [10_000, 1.0])
        if how == "sigkill":
            leaving.kill()
        else:
            leaving.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(leaving.wait, 30)
        done, ok, dups = await resume_and_count(child)
        st = await status(observer)
        figures(f"buffered_results_{how}", tasks=n, done=done, ok=ok, lost=n - ok, duplicates_dropped=dups,
                worker_exit=code, scheduler_held=st and st["queued"] + st["running"])
        assert ok == n, f"{n - ok} of {n} results lost"
        assert staying.poll() is None


@pytest.mark.timeout(60)
async def test_client_stalled_for_seconds_gets_every_result_when_it_reads_again(procs: Procs) -> None:
    address = f"tcp://{LOOPBACK}:{free_port_pair()}"
    await procs.scheduler(address, "--client-timeout-s", "120")
    await procs.workers(address, 2)
    n = 20_000
    async with zfabric.Client(address, timeout_s=60) as observer:
        started = time.monotonic()
        child = await stall_client_until_all_produced(procs, observer, address, f"{TASKS}:sblob", n, [10_000, 0.001])
        stalled_s = time.monotonic() - started  # submitting, then stopped while every result is produced
        done, ok, dups = await resume_and_count(child)
        st = await status(observer)
        figures("stalled_client", tasks=n, stalled_s=stalled_s, ok=ok, lost=n - ok, duplicates_dropped=dups,
                scheduler_held=st and st["queued"] + st["running"])
        assert ok == n, f"{n - ok} of {n} results lost after a {stalled_s:.1f} s stall"
