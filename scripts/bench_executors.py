"""`concurrent.futures`-style executors side by side: `Executor.map` of no-op tasks, each in a fresh interpreter.

    python scripts/bench_executors.py                   # 20,000 tasks, 3 interleaved rounds
    python scripts/bench_executors.py --tasks 5000 --repeat 1 --only zfabric,pool1

Runs zfabric.Executor.map, zfabric's SyncClient.map on the same fabric (the issue's yardstick: Executor.map
should reach 0.8x of it), ProcessPoolExecutor (chunksize 1 and 100), loky, Dask's `client.get_executor()`
and Parsl's HighThroughputExecutor, each with 2 workers, where installed (`pip install -e '.[bench]'`); a
peer that is missing or fails prints its reason and the run goes on. Each round runs every system once, so
all see the machine in the same mood; figures are medians over rounds. Speed is printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

WORKERS = 2
ROOT = str(Path(__file__).resolve().parent.parent)


def _timed_map(executor: Any, n: int, **kwargs: Any) -> float:
    from zfabric.demo_tasks import inc
    list(executor.map(inc, range(min(n, 2000)), **kwargs))  # warm up: workers started, code imported
    started = time.perf_counter()
    results = list(executor.map(inc, range(n), **kwargs))
    seconds = time.perf_counter() - started
    assert results[-1] == n, "wrong results"
    return n / seconds


def zfabric_executor(n: int) -> float:
    import zfabric
    with zfabric.Executor(WORKERS, app=["zfabric.demo_tasks"]) as ex:
        return _timed_map(ex, n)


def zfabric_client_map(n: int) -> float:
    import zfabric
    from zfabric.demo_tasks import inc
    with zfabric.Executor(WORKERS, app=["zfabric.demo_tasks"]) as ex:
        sync = ex._running.sync  # the SyncClient on the same local fabric
        sync.map(inc, range(min(n, 2000)))
        started = time.perf_counter()
        assert sync.map(inc, range(n))[-1] == n
        return n / (time.perf_counter() - started)


def pool(chunksize: int) -> Callable[[int], float]:
    def run(n: int) -> float:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(WORKERS) as ex:
            return _timed_map(ex, n, chunksize=chunksize)
    return run


def loky_executor(n: int) -> float:
    import loky
    ex = loky.get_reusable_executor(max_workers=WORKERS)
    try:
        return _timed_map(ex, n)
    finally:
        ex.shutdown(wait=True)


def dask_executor(n: int) -> float:
    from dask.distributed import Client, LocalCluster
    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        return _timed_map(client.get_executor(), n)


def parsl_executor(n: int) -> float:
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider
    config = Config(executors=[HighThroughputExecutor(label="htex", max_workers_per_node=WORKERS,
                                                      address="127.0.0.1", provider=LocalProvider())])
    with parsl.load(config):
        from zfabric.demo_tasks import inc
        ex = parsl.dfk().executors["htex"]
        list(map(lambda f: f.result(), [ex.submit(inc, {}, i) for i in range(min(n, 2000))]))
        started = time.perf_counter()
        futures = [ex.submit(inc, {}, i) for i in range(n)]
        assert [f.result() for f in futures][-1] == n
        return n / (time.perf_counter() - started)


SYSTEMS: dict[str, tuple[str, Callable[[int], float]]] = {
    "zfabric": ("zfabric.Executor.map", zfabric_executor),
    "zfabric-client": ("zfabric SyncClient.map (same fabric)", zfabric_client_map),
    "pool1": ("ProcessPoolExecutor chunksize=1", pool(1)),
    "pool100": ("ProcessPoolExecutor chunksize=100", pool(100)),
    "loky": ("loky reusable executor", loky_executor),
    "dask": ("Dask client.get_executor()", dask_executor),
    "parsl": ("Parsl HighThroughputExecutor", parsl_executor),
}


def fresh(name: str, n: int) -> dict[str, Any]:
    """One measurement in a fresh interpreter (no system runs in a process another has been through)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                f"import bench_executors as b\n"
                f"try:\n    row = {{'rate': b.SYSTEMS[{name!r}][1]({n})}}\n"
                f"except Exception as exc:\n    row = {{'error': f'{{type(exc).__name__}}: {{exc}}'[:200]}}\n"
                f"open({str(out)!r}, 'w').write(json.dumps(row))")
        subprocess.run([sys.executable, "-c", code], cwd=tmp, timeout=600, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text()) if out.exists() else {"error": "the run died"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SYSTEMS)
    rates: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, str] = {}
    for round_no in range(args.repeat):
        for name in names:
            if name in errors:
                continue
            print(f"[bench] round {round_no + 1}: {name} ...", file=sys.stderr, flush=True)
            row = fresh(name, args.tasks)
            if "error" in row:
                errors[name] = row["error"]
            else:
                rates[name].append(row["rate"])
    print(f"\n{args.tasks:,} no-op tasks through Executor.map, {WORKERS} workers, median of {args.repeat} rounds\n")
    print(f"| {'system':<38} | {'tasks/s':>9} | {'zfabric.Executor vs it':>22} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 24}|")
    ours = statistics.median(rates["zfabric"]) if rates.get("zfabric") else None
    for name in names:
        label = SYSTEMS[name][0]
        if name in errors:
            print(f"| {label:<38} | {'-':>9} | {('not run: ' + errors[name])[:60]} |")
            continue
        rate = statistics.median(rates[name])
        ratio = f"{ours / rate:.2f}x" if ours else "-"
        print(f"| {label:<38} | {rate:>9,.0f} | {ratio:>22} |")


if __name__ == "__main__":
    main()
