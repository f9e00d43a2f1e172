"""Does dispatch cost grow with the number of workers? One scheduler, N worker processes, one client.

    python scripts/bench_workers.py                       # N = 2, 20, 100
    python scripts/bench_workers.py --workers 2,100 --tasks 200000
    python scripts/bench_workers.py --tree /path/to/other/checkout   # the same run on another version

For each N it prints no-op tasks/s through `client.map` and the scheduler's CPU time per task (from
/proc, user + system), medians over the repeats, and the ratios to the smallest N: the median of each
repeat's ratio to the smallest N's run just before it (a busy machine drifts less within one round).
Every run is also printed as it ends (stderr). With --tree, every N also runs on that
checkout's zfabric (PYTHONPATH), interleaved, so both versions see the machine in the same mood.
Speed is printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = str(Path(__file__).resolve().parent.parent)


def start(tree: str, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.Popen([sys.executable, "-m", "zfabric", "--log-level", "error", *args], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(tree: str, n_workers: int, tasks: int, port: int) -> dict[str, Any]:
    sys.path.insert(0, tree)
    import zfabric  # the version under test: run in a fresh interpreter per tree (see main)
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start(tree, "scheduler", "--bind", address)
    workers = [start(tree, "worker", address, "--app", "zfabric.demo_tasks", "--concurrency", "1000")
               for _ in range(n_workers)]
    try:
        async with zfabric.Client(address, timeout_s=120) as client:
            deadline = time.monotonic() + 180
            while len((await client.status())["workers"]) < n_workers:
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not register")
                await asyncio.sleep(0.2)  # sync-ok: a benchmark waiting for its workers
            await client.map("zfabric.demo_tasks:inc", range(2000))  # warm up every path
            sched = psutil.Process(scheduler.pid)
            cpu0 = sum(sched.cpu_times()[:2])
            started = time.perf_counter()
            await client.map("zfabric.demo_tasks:inc", range(tasks))
            seconds = time.perf_counter() - started
            cpu = sum(sched.cpu_times()[:2]) - cpu0
    finally:
        for proc in workers + [scheduler]:
            proc.terminate()
        for proc in workers + [scheduler]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"workers": n_workers, "tasks_per_s": tasks / seconds, "sched_us_per_task": cpu / tasks * 1e6}


def run_fresh(tree: str, n_workers: int, tasks: int, port: int) -> dict[str, Any]:
    """One measurement in a fresh interpreter that imports `tree`'s zfabric."""
    code = (f"import asyncio, json, sys; sys.path.insert(0, {ROOT + '/scripts'!r}); import bench_workers as b; "
            f"print(json.dumps(asyncio.run(b.measure({tree!r}, {n_workers}, {tasks}, {port}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=tree))
    if out.returncode:
        raise RuntimeError(f"the {n_workers}-worker run on {tree} failed:\n{out.stderr[-3000:]}")
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="2,20,100")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tree", default=None, help="another checkout to run beside this one")
    args = parser.parse_args()
    trees = {"this": ROOT} | ({"other": args.tree} if args.tree else {})
    counts = sorted(int(n) for n in args.workers.split(","))
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    port = 27100
    for _ in range(args.repeat):
        for n in counts:
            for name, tree in trees.items():
                port += 2
                row = run_fresh(tree, n, args.tasks, port)
                rows.setdefault((name, n), []).append(row)
                print(f"[bench] {name}: {n} workers: {row['tasks_per_s']:,.0f} tasks/s, "
                      f"{row['sched_us_per_task']:.2f} µs/task", file=sys.stderr, flush=True)
    print(f"\n{'version':8} {'workers':>7} {'tasks/s':>10} {'sched µs/task':>14} {'t/s vs min N':>13} {'µs vs min N':>12}")
    for name in trees:
        for n in counts:
            runs, base = rows[(name, n)], rows[(name, counts[0])]
            tps = statistics.median(r["tasks_per_s"] for r in runs)
            us = statistics.median(r["sched_us_per_task"] for r in runs)
            tps_ratio = statistics.median(r["tasks_per_s"] / b["tasks_per_s"] for r, b in zip(runs, base))
            us_ratio = statistics.median(r["sched_us_per_task"] / b["sched_us_per_task"] for r, b in zip(runs, base))
            print(f"{name:8} {n:7d} {tps:10,.0f} {us:14.2f} {tps_ratio:13.2f} {us_ratio:12.2f}")


if __name__ == "__main__":
    main()
