"""`zfabric demo`: a real workload on a local fabric, with progress and a summary (layer 6)."""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from typing import Any

from .handle import as_completed
from .local import local

TASKS = "zfabric.demo_tasks"


class Progress:
    """One line of progress on stderr (redrawn on a terminal, every 10 % otherwise)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.start = label, total, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._shown = -1

    def update(self, n: int) -> None:
        pct = n * 100 // max(1, self.total)
        step = pct if self.tty else pct // 10 * 10
        if step == self._shown:
            return
        self._shown = step
        rate = n / max(1e-9, time.perf_counter() - self.start)
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        line = f"  {self.label:<22} [{bar}] {pct:3d}%  {n:>7}/{self.total}  {rate:>9,.0f}/s"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and n >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_demo(workers: int, n_tasks: int) -> dict[str, Any]:
    print(f"zfabric demo: a local fabric with {workers} workers on 127.0.0.1", flush=True)
    t0 = time.perf_counter()
    async with local(workers=workers, app=[TASKS]) as client:
        startup = time.perf_counter() - t0
        print(f"  fabric up in {startup:.2f} s at {client.config.address}", flush=True)
        results: dict[str, Any] = {"startup_s": startup}

        progress = Progress("no-op tasks (map)", n_tasks)
        t = time.perf_counter()
        done = 0
        async for value in client.imap(f"{TASKS}:inc", range(n_tasks)):
            done += 1
            if done % 500 == 0 or done == n_tasks:
                progress.update(done)
        results["noop_per_s"] = n_tasks / (time.perf_counter() - t)
        assert value == n_tasks, "map returned results out of order"

        n_cpu = 40 * workers
        progress = Progress("CPU tasks (sha256)", n_cpu)
        t = time.perf_counter()
        handles = [client.submit(f"{TASKS}:digest", seed, 20_000) for seed in range(n_cpu)]
        ran_on: Counter[int] = Counter()
        for i, handle in enumerate([h async for h in as_completed(handles)], 1):
            progress.update(i)
        pid_handles = [client.submit(f"{TASKS}:where", 0.01) for _ in range(4 * workers)]
        for handle in pid_handles:
            ran_on[(await handle)[1]] += 1
        results["cpu_s"] = time.perf_counter() - t
        results["workers_used"] = len(ran_on)

        n_sleep = 5_000 * workers
        progress = Progress("async sleeps (0.5 s)", n_sleep)
        t = time.perf_counter()
        handles = [client.submit(f"{TASKS}:asleep", 0.5) for _ in range(n_sleep)]
        for i, _ in enumerate([h async for h in as_completed(handles)], 1):
            if i % 500 == 0 or i == n_sleep:
                progress.update(i)
        results["sleep_wall_s"] = time.perf_counter() - t

        n_rt = 500
        progress = Progress("round trips", n_rt)
        samples = []
        for i in range(n_rt):
            t = time.perf_counter()
            await client.submit(f"{TASKS}:inc", i)
            samples.append(time.perf_counter() - t)
            if (i + 1) % 50 == 0:
                progress.update(i + 1)
        results["rtt_p50_us"] = statistics.median(samples) * 1e6
        results["rtt_p99_us"] = _quantile(samples, 0.99) * 1e6

    print("\nSummary")
    print(f"  throughput   {results['noop_per_s']:>10,.0f} no-op tasks/s  ({n_tasks:,} tasks, {workers} workers)")
    print(f"  latency      p50 {results['rtt_p50_us']:,.0f} us   p99 {results['rtt_p99_us']:,.0f} us  "
          f"(one task at a time)")
    print(f"  concurrency  {n_sleep:,} x sleep(0.5 s) in {results['sleep_wall_s']:.2f} s")
    print(f"  CPU work     {n_cpu} sha256 chains in {results['cpu_s']:.2f} s on {results['workers_used']} workers")
    print(f"  start-up     {results['startup_s']:.2f} s")
    return results
