"""`zfabric bench`: zfabric's own figures for the side-by-side benchmark (layer 6).

Each figure is measured on a fresh local fabric (2 workers by default), the
same way `scripts/bench_compare.py` measures the peers: no-op tasks/s over
N tasks, one-at-a-time round trip p50/p99, wall time of N concurrent
``await asyncio.sleep(0.5)``, client+scheduler RSS per pending task, and
throughput with 1 KB and 1 MB arguments.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from .local import local

TASKS = "zfabric.demo_tasks"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def throughput(client: Any, n: int) -> float:
    t = time.perf_counter()
    results = await client.map(f"{TASKS}:inc", range(n))
    elapsed = time.perf_counter() - t
    assert results[-1] == n
    return n / elapsed


async def round_trips(client: Any, n: int) -> tuple[float, float]:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        await client.submit(f"{TASKS}:inc", i)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), quantile(samples, 0.99)


async def sleeps(client: Any, n: int) -> float:
    t = time.perf_counter()
    await client.gather([client.submit(f"{TASKS}:asleep", 0.5) for _ in range(n)])
    return time.perf_counter() - t


async def payload_rate(client: Any, size: int, n: int) -> float:
    blob = os.urandom(size)
    t = time.perf_counter()
    sizes = await client.map(f"{TASKS}:size", [blob] * n, window=max(8, min(n, 64 * 1024 * 1024 // size)))
    elapsed = time.perf_counter() - t
    assert sizes[0] == size
    return n / elapsed


def memory_per_pending_fresh(n: int, workers: int) -> float:
    """`memory_per_pending` in a fresh interpreter: this process's heap, grown and freed by the other
    figures (or by peers benchmarked in the same process), would absorb the growth and hide it."""
    code = f"import asyncio; from zfabric.bench import memory_per_pending; print(asyncio.run(memory_per_pending({n}, {workers})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return float(done.stdout.split()[-1])


async def memory_per_pending(n: int, workers: int) -> float:
    """RSS growth of client + scheduler per task, with `n` submitted while every worker slot is busy."""
    fabric = local(workers=workers, app=[TASKS], concurrency=1)
    async with fabric as client:
        blockers = [client.submit(f"{TASKS}:asleep", 60.0) for _ in range(workers)]
        await asyncio.sleep(0.5)  # let the blockers occupy every slot
        scheduler_pid = fabric.supervisor.scheduler.proc.pid  # type: ignore[union-attr]
        before = rss_bytes(os.getpid()) + rss_bytes(scheduler_pid)
        handles = [client.submit(f"{TASKS}:inc", i) for i in range(n)]
        deadline = time.monotonic() + 60
        while client._outbox and client._in_scheduler < client.config.window and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # until the scheduler holds a full window and the client the rest
        await asyncio.sleep(0.5)
        after = rss_bytes(os.getpid()) + rss_bytes(scheduler_pid)
        per_task = (after - before) / n
        for h in handles + blockers:
            h.cancel()
    return per_task


async def run_bench(workers: int = 2, tasks: int = 20_000, sleep_tasks: int = 20_000, round_trip_n: int = 1000,
                    pending: int = 200_000, quick: bool = False) -> dict[str, Any]:
    """All of zfabric's figures; `quick` shrinks every count (for the test suite)."""
    if quick:
        tasks, sleep_tasks, round_trip_n, pending = 500, 500, 50, 2_000
    out: dict[str, Any] = {"system": "zfabric", "workers": workers}
    started = time.perf_counter()
    async with local(workers=workers, app=[TASKS]) as client:
        await client.submit(f"{TASKS}:inc", 0)
        out["startup_s"] = time.perf_counter() - started
        await throughput(client, min(tasks, 2000))  # warm-up: connections, inline policy
        out["tasks_per_s"] = await throughput(client, tasks)
        p50, p99 = await round_trips(client, round_trip_n)
        out["p50_us"], out["p99_us"] = p50 * 1e6, p99 * 1e6
        out["sleep_wall_s"] = await sleeps(client, sleep_tasks)
        out["sleep_tasks"] = sleep_tasks
        out["kb_tasks_per_s"] = await payload_rate(client, 1024, min(tasks, 20_000))
        out["mb_tasks_per_s"] = await payload_rate(client, 1024 * 1024, 20 if quick else 200)
    loop = asyncio.get_running_loop()
    out["bytes_per_pending"] = await loop.run_in_executor(None, memory_per_pending_fresh, pending, workers)
    out["pending_tasks"] = pending
    return out


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['system']:<34} {r.get('tasks_per_s', float('nan')):>10,.0f} {r.get('p50_us', float('nan')):>9,.0f} "
            f"{r.get('p99_us', float('nan')):>9,.0f} {r.get('sleep_wall_s', float('nan')):>8.2f} "
            f"{r.get('kb_tasks_per_s', float('nan')):>10,.0f} {r.get('mb_tasks_per_s', float('nan')):>8,.0f} "
            f"{r.get('bytes_per_pending', float('nan')):>8,.0f}")


HEADER = (f"{'system':<34} {'tasks/s':>10} {'p50 µs':>9} {'p99 µs':>9} {'sleeps s':>8} {'1KB t/s':>10} "
          f"{'1MB t/s':>8} {'B/pend':>8}")
