#!/usr/bin/env python3
"""Benchmark zfabric's peers side by side, on this host, with 2 workers each.

Systems: ProcessPoolExecutor(2) with chunksize 1 and 100, Dask distributed
(LocalCluster, 2 worker processes x 1 thread), ipyparallel (2 engines), Ray
(2 CPUs, skipped with a note when it cannot be imported) and the raw pyzmq
ceiling of ``bench_raw_pyzmq.py``. Every address configured here is
127.0.0.1 (Ray's own head process still probes cloud metadata at start).

Every system gets the same workloads:

* no-op throughput: ``inc(x) = x + 1`` over N tasks handed over at once;
* round trip: one ``inc`` at a time, p50 and p99 over ``latency_samples`` calls;
* argument size: ``size(data) = len(data)`` over distinct 1 KB and 1 MB
  ``bytes`` objects (N/4 and N/100 tasks), so no layer can dedupe them;
* concurrency: wall time of N concurrent 0.5 s sleeps, done as each system
  can (the row's note names the method); ``sleep_budget_s`` bounds it.

Each ``bench_*`` function starts its system, warms it up, measures every
figure ``repeat`` times, shuts the system down and returns one row: a dict
with the keys of ``ROW_KEYS`` holding medians (times in seconds, rates in
tasks per second, ``None`` where not measured). ``run_all`` runs a selection
and never raises: a peer that cannot be imported or that fails gives a row
whose note says why, and the run goes on. A combined script imports this
module, registers its own benchmark in ``BENCHES`` (a function of ``Sizes``
returning a row, e.g. built with ``measure_async``, ``bounded_sleeps_async``
and ``make_row`` as ``bench_raw_pyzmq`` does), calls ``run_all`` and prints
``format_table`` with its ratios.

Task functions live at module level here and are pickled by reference as
``bench_peers.inc`` etc.; the scripts directory is put on ``sys.path`` and
``PYTHONPATH`` so spawned workers can import them.

Usage: ``python scripts/bench_peers.py [--tasks N] [--sleep-tasks N]
[--repeat R] [--only pool1,dask,...] [--json PATH] [--tiny]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

SCRIPTS_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
WORKERS = 2
SLEEP_S = 0.5
KB = 1024
MB = 1024 * 1024

ROW_KEYS = (
    "system",  # display name
    "version",  # version of the system measured
    "startup_s",  # start plus first task done, seconds
    "tasks_per_s",  # no-op inc tasks per second
    "p50_s",  # round trip of one task at a time, median, seconds
    "p99_s",  # round trip, 99th percentile, seconds
    "sleeps_wall_s",  # wall time of sleeps_n concurrent 0.5 s sleeps, seconds
    "sleeps_n",  # how many sleeps that wall time is for
    "kb_tasks_per_s",  # tasks per second with a distinct 1 KB bytes argument
    "mb_tasks_per_s",  # tasks per second with a distinct 1 MB bytes argument
    "note",  # method notes, skips and errors
)
Row = dict[str, Any]
Sample = dict[str, float]


# --- task functions (module level: pickled by reference) -------------------


def inc(x: int) -> int:
    """The no-op task."""
    return x + 1


def size(data: bytes) -> int:
    """Touch an argument of any size and return something small."""
    return len(data)


def echo(data: Any) -> Any:
    """Return the argument: a round trip of a large value."""
    return data


async def async_sleep(seconds: float) -> None:
    """The concurrency task, for systems that run ``async def`` tasks."""
    await asyncio.sleep(seconds)


class SleepActor:
    """An actor whose method is the ``await asyncio.sleep`` task (Ray)."""

    async def sleep(self, seconds: float) -> None:
        """Sleep without holding a thread."""
        await asyncio.sleep(seconds)

    def ping(self) -> bool:
        """Answer once the actor is up."""
        return True


# --- sizes, rows and measurement --------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much work each figure is measured over."""

    tasks: int = 20_000
    sleeps: int = 20_000
    repeat: int = 3
    latency_samples: int = 300
    kb_tasks: int = 5_000
    mb_tasks: int = 200
    sleep_budget_s: float = 60.0

    @classmethod
    def scaled(cls, n_tasks: int, n_sleep: int, repeat: int) -> Sizes:
        """Sizes derived from the task and sleep counts of the command line."""
        return cls(
            tasks=n_tasks,
            sleeps=n_sleep,
            repeat=repeat,
            latency_samples=min(300, n_tasks),
            kb_tasks=max(1, n_tasks // 4),
            mb_tasks=max(1, n_tasks // 100),
        )


def make_row(system: str, version: str, note: str = "", **figures: Any) -> Row:
    """A row with every key of ``ROW_KEYS``; figures not given are ``None``."""
    unknown = set(figures) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"unknown row keys: {sorted(unknown)}")
    row: Row = dict.fromkeys(ROW_KEYS)
    row.update(figures, system=system, version=version, note=note)
    return row


def medians(samples: list[Sample]) -> Sample:
    """Per key, the median over the repeats."""
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def payloads(count: int, nbytes: int) -> list[bytes]:
    """``count`` distinct ``bytes`` objects of ``nbytes`` each (none can be deduped)."""
    body = os.urandom(nbytes)
    return [i.to_bytes(8, "little") + body[8:] for i in range(count)]


def version_of(distribution: str) -> str:
    """The installed version of a distribution, or ``"?"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class Peer(Protocol):
    """What the measurement needs from a started system."""

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """Run ``fn`` on every item, all handed over at once; results in order."""

    def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """Run ``fn(item)`` and wait for its result."""


class AsyncPeer(Protocol):
    """``Peer`` for systems driven from an event loop (raw pyzmq, zfabric)."""

    async def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """Run ``fn`` on every item, all handed over at once; results in order."""

    async def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """Run ``fn(item)`` and wait for its result."""


Sleeper = Callable[[int], float]
"""Runs n concurrent 0.5 s sleeps on a started system; returns the wall time."""
AsyncSleeper = Callable[[int], Awaitable[float]]
"""``Sleeper`` for systems driven from an event loop."""


@dataclass(frozen=True)
class Workloads:
    """The arguments and expected results of every measured map."""

    numbers: list[int]
    incremented: list[int]
    kb_args: list[bytes]
    mb_args: list[bytes]

    @classmethod
    def of(cls, sizes: Sizes) -> Workloads:
        """Build the workloads for ``sizes`` (distinct payloads, made once)."""
        numbers = list(range(sizes.tasks))
        return cls(numbers, [x + 1 for x in numbers], payloads(sizes.kb_tasks, KB), payloads(sizes.mb_tasks, MB))

    def maps(self) -> list[tuple[str, Callable[[Any], Any], list[Any], list[Any]]]:
        """(figure, function, arguments, expected results) of each throughput map."""
        return [
            ("tasks_per_s", inc, self.numbers, self.incremented),
            ("kb_tasks_per_s", size, self.kb_args, [KB] * len(self.kb_args)),
            ("mb_tasks_per_s", size, self.mb_args, [MB] * len(self.mb_args)),
        ]


def _check(name: str, results: Any, expected: Any) -> None:
    if results != expected:
        raise RuntimeError(f"{name}: wrong results")


def _latency_figures(trips: list[float]) -> Sample:
    return {"p50_s": percentile(trips, 50), "p99_s": percentile(trips, 99)}


def measure(peer: Peer, sizes: Sizes) -> Sample:
    """Throughput, round trip and argument-size figures, medians over repeats."""
    work = Workloads.of(sizes)
    samples = []
    for _ in range(sizes.repeat):
        sample = {}
        for figure, fn, items, expected in work.maps():
            begin = time.perf_counter()
            results = peer.map(fn, items)
            sample[figure] = len(items) / (time.perf_counter() - begin)
            _check(fn.__name__, list(results), expected)
        trips = []
        for i in range(sizes.latency_samples):
            begin = time.perf_counter()
            result = peer.call(inc, i)
            trips.append(time.perf_counter() - begin)
            _check("inc", result, i + 1)
        samples.append(sample | _latency_figures(trips))
    return medians(samples)


async def measure_async(peer: AsyncPeer, sizes: Sizes) -> Sample:
    """``measure`` for an ``AsyncPeer``, timed inside the event loop."""
    work = Workloads.of(sizes)
    samples = []
    for _ in range(sizes.repeat):
        sample = {}
        for figure, fn, items, expected in work.maps():
            begin = time.perf_counter()
            results = await peer.map(fn, items)
            sample[figure] = len(items) / (time.perf_counter() - begin)
            _check(fn.__name__, list(results), expected)
        trips = []
        for i in range(sizes.latency_samples):
            begin = time.perf_counter()
            result = await peer.call(inc, i)
            trips.append(time.perf_counter() - begin)
            _check("inc", result, i + 1)
        samples.append(sample | _latency_figures(trips))
    return medians(samples)


def _probe_size(sizes: Sizes) -> int:
    return min(sizes.sleeps, 1000)


def _plan_sleeps(probe_n: int, probe_wall: float, sizes: Sizes) -> tuple[int, int, str]:
    """How many sleeps per run and how many runs fit ``sizes.sleep_budget_s``.

    The probe predicts the wall of n sleeps as 0.5 s plus its per-sleep
    overhead times n. If one run of ``sizes.sleeps`` would not fit, n is cut
    to what fits; then as many of the ``repeat`` runs are made as fit (at
    least one). Returns (n, runs, a note saying what was cut, or "").
    """
    per_sleep = max(probe_wall - SLEEP_S, 1e-9) / probe_n
    n = sizes.sleeps
    notes = []
    if SLEEP_S + per_sleep * n > sizes.sleep_budget_s:
        n = max(probe_n, int((sizes.sleep_budget_s - SLEEP_S) / per_sleep) // 100 * 100)
        notes.append(f"{n:,} of {sizes.sleeps:,} sleeps to stay within {sizes.sleep_budget_s:.0f} s")
    runs = max(1, min(sizes.repeat, int(sizes.sleep_budget_s // (SLEEP_S + per_sleep * n))))
    if runs < sizes.repeat:
        notes.append(f"sleeps: {runs} of {sizes.repeat} runs (budget)")
    return n, runs, "; ".join(notes)


def bounded_sleeps(sleeper: Sleeper, sizes: Sizes) -> tuple[Sample, str]:
    """Median wall of ``sizes.sleeps`` sleeps within the budget (see ``_plan_sleeps``).

    A probe of up to 1,000 sleeps runs first; it also warms the system up.
    Returns the figures ``sleeps_wall_s`` and ``sleeps_n``, and a note.
    """
    probe_n = _probe_size(sizes)
    n, runs, note = _plan_sleeps(probe_n, sleeper(probe_n), sizes)
    walls = [sleeper(n) for _ in range(runs)]
    return {"sleeps_wall_s": statistics.median(walls), "sleeps_n": n}, note


async def bounded_sleeps_async(sleeper: AsyncSleeper, sizes: Sizes) -> tuple[Sample, str]:
    """``bounded_sleeps`` for an ``AsyncSleeper``."""
    probe_n = _probe_size(sizes)
    n, runs, note = _plan_sleeps(probe_n, await sleeper(probe_n), sizes)
    walls = [await sleeper(n) for _ in range(runs)]
    return {"sleeps_wall_s": statistics.median(walls), "sleeps_n": n}, note


def _make_importable() -> None:
    """Let processes started from here import this module (and its task functions)."""
    scripts = str(SCRIPTS_DIR)
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if scripts not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([scripts, *paths])


def _startup(peer: Peer, begin: float) -> float:
    """Seconds from ``begin`` (a ``perf_counter``) until a first task is done on ``peer``."""
    if peer.call(inc, 0) != 1:
        raise RuntimeError("inc: wrong result")
    return time.perf_counter() - begin


def _wall(run: Callable[[], object]) -> float:
    """Seconds taken by ``run()``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# --- ProcessPoolExecutor ------------------------------------------------------


class _PoolPeer:
    """A ProcessPoolExecutor mapping with a fixed chunksize."""

    def __init__(self, pool: ProcessPoolExecutor, chunksize: int) -> None:
        self.pool = pool
        self.chunksize = chunksize

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=self.chunksize))

    def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return self.pool.submit(fn, item).result()


def bench_process_pool(sizes: Sizes, chunksize: int) -> Row:
    """ProcessPoolExecutor(2), default start method, ``map(chunksize=...)``."""
    _make_importable()
    begin = time.perf_counter()
    pool = ProcessPoolExecutor(WORKERS)
    try:
        peer = _PoolPeer(pool, chunksize)
        startup = _startup(peer, begin)
        figures = measure(peer, sizes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return make_row(
        f"ProcessPoolExecutor(2) chunksize={chunksize}",
        f"Python {platform.python_version()}",
        note="no concurrent sleeps: a process runs one task at a time",
        startup_s=startup,
        **figures,
    )


# --- Dask distributed ---------------------------------------------------------


class _DaskPeer:
    """A Dask client: ``client.map``/``gather`` and ``submit().result()``."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return self.client.gather(self.client.map(fn, items, pure=False))

    def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return self.client.submit(fn, item, pure=False).result()


@contextlib.contextmanager
def _dask_client(threads_per_worker: int) -> Iterator[Any]:
    """A LocalCluster of 2 worker processes on 127.0.0.1 and a client to it."""
    from distributed import Client, LocalCluster

    with warnings.catch_warnings():
        # "Large object ... detected in task graph" for the 1 MB arguments.
        warnings.simplefilter("ignore", UserWarning)
        with (
            LocalCluster(
                n_workers=WORKERS,
                threads_per_worker=threads_per_worker,
                processes=True,
                host=HOST,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client


def bench_dask(sizes: Sizes) -> Row:
    """Dask distributed LocalCluster(n_workers=2, threads_per_worker=1, processes=True).

    Dask workers run ``async def`` tasks on their event loop, but no more at
    once than they have threads, so the sleeps run in a second LocalCluster
    whose ``threads_per_worker`` is half the sleeps (coroutines start no
    threads). On 2 cores this beat both alternatives tried: ``time.sleep`` in
    1,000 threads per worker (about 2x slower; 10,000 threads hung) and async
    actors (about 300 calls/s).
    """
    _make_importable()
    begin = time.perf_counter()
    with _dask_client(threads_per_worker=1) as client:
        peer = _DaskPeer(client)
        startup = _startup(peer, begin)
        figures = measure(peer, sizes)
    slots = max(1, math.ceil(sizes.sleeps / WORKERS))
    with _dask_client(threads_per_worker=slots) as client:
        sleep_peer = _DaskPeer(client)
        sleeps, budget_note = bounded_sleeps(lambda n: _wall(lambda: sleep_peer.map(async_sleep, [SLEEP_S] * n)), sizes)
    note = f"sleeps: async def tasks, threads_per_worker={slots:,}"
    return make_row(
        "Dask distributed",
        version_of("distributed"),
        note="; ".join(filter(None, [note, budget_note])),
        startup_s=startup,
        **figures,
        **sleeps,
    )


# --- ipyparallel --------------------------------------------------------------


class _IppPeer:
    """An ipyparallel load-balanced view."""

    def __init__(self, view: Any) -> None:
        self.view = view

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return self.view.map_sync(fn, items)

    def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return self.view.apply_sync(fn, item)


def bench_ipyparallel(sizes: Sizes) -> Row:
    """ipyparallel: ``Cluster(n=2)``, load-balanced view ``map_sync``/``apply_sync``."""
    _make_importable()
    import ipyparallel as ipp

    begin = time.perf_counter()
    cluster = ipp.Cluster(n=WORKERS, controller_ip=HOST, log_level=logging.ERROR)
    try:
        client = cluster.start_and_connect_sync()
        try:
            client.wait_for_engines(WORKERS, timeout=60)
            peer = _IppPeer(client.load_balanced_view())
            startup = _startup(peer, begin)
            figures = measure(peer, sizes)
        finally:
            client.close()
    finally:
        cluster.stop_cluster_sync()
    return make_row(
        "ipyparallel",
        version_of("ipyparallel"),
        note="no concurrent sleeps: an engine runs one task at a time",
        startup_s=startup,
        **figures,
    )


# --- Ray ----------------------------------------------------------------------


class _RayPeer:
    """Ray remote functions: ``ray.get([f.remote(x) ...])``."""

    def __init__(self, ray: Any) -> None:
        self.ray = ray
        self.remotes: dict[Callable[[Any], Any], Any] = {}

    def _remote(self, fn: Callable[[Any], Any]) -> Any:
        if fn not in self.remotes:
            self.remotes[fn] = self.ray.remote(fn)
        return self.remotes[fn]

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        remote = self._remote(fn)
        return self.ray.get([remote.remote(item) for item in items])

    def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return self.ray.get(self._remote(fn).remote(item))


def _ray_sleeper(ray: Any, sizes: Sizes) -> tuple[Sleeper, list[Any]]:
    """Two async actors (one per CPU) that each take half the sleeps at once."""
    concurrency = max(1, math.ceil(sizes.sleeps / WORKERS))
    actor_class = ray.remote(num_cpus=1, max_concurrency=concurrency)(SleepActor)
    actors = [actor_class.remote() for _ in range(WORKERS)]
    ray.get([actor.ping.remote() for actor in actors])

    def sleeper(n: int) -> float:
        return _wall(lambda: ray.get([actors[i % WORKERS].sleep.remote(SLEEP_S) for i in range(n)]))

    return sleeper, actors


def bench_ray(sizes: Sizes) -> Row:
    """Ray: ``ray.init(num_cpus=2)``, remote functions, and async actors for the sleeps."""
    _make_importable()
    # Read when ray is imported: no usage reports, and the node address stays
    # 127.0.0.1 (by default Ray swaps loopback for the host's outward address).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    begin = time.perf_counter()
    ray.init(
        num_cpus=WORKERS,
        include_dashboard=False,
        _node_ip_address=HOST,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        peer = _RayPeer(ray)
        startup = _startup(peer, begin)
        figures = measure(peer, sizes)
        sleeper, actors = _ray_sleeper(ray, sizes)
        sleeps, budget_note = bounded_sleeps(sleeper, sizes)
        for actor in actors:
            ray.kill(actor)
    finally:
        ray.shutdown()
    note = f"sleeps: {WORKERS} async actors, max_concurrency={math.ceil(sizes.sleeps / WORKERS)}"
    return make_row(
        "Ray",
        version_of("ray"),
        note="; ".join(filter(None, [note, budget_note])),
        startup_s=startup,
        **figures,
        **sleeps,
    )


# --- the raw pyzmq ceiling ----------------------------------------------------


def bench_raw(sizes: Sizes) -> Row:
    """The raw pyzmq pipeline of zfabric's shape (see ``bench_raw_pyzmq``)."""
    _make_importable()
    import bench_raw_pyzmq

    return bench_raw_pyzmq.bench_raw(sizes)


# --- running and reporting ----------------------------------------------------

BENCHES: dict[str, Callable[[Sizes], Row]] = {
    "raw": bench_raw,
    "pool1": lambda sizes: bench_process_pool(sizes, chunksize=1),
    "pool100": lambda sizes: bench_process_pool(sizes, chunksize=100),
    "dask": bench_dask,
    "ipyparallel": bench_ipyparallel,
    "ray": bench_ray,
}
"""Every benchmark by its ``--only`` name, in run order."""

TINY_ONLY = ("raw", "pool1", "pool100", "dask")
"""What ``--tiny`` runs: Ray and ipyparallel take seconds just to start."""


def run_peer(name: str, sizes: Sizes) -> Row:
    """Run one benchmark; never raises (a failure becomes a row with a note)."""
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    begin = time.perf_counter()
    try:
        row = BENCHES[name](sizes)
    except ImportError as exc:
        row = make_row(name, "not installed", note=f"skipped: {exc}")
    except Exception as exc:  # a failing peer must not stop the others
        traceback.print_exc()
        row = make_row(name, "?", note=f"error: {type(exc).__name__}: {exc}")
    print(f"[bench] {name}: {time.perf_counter() - begin:.1f} s {row['note']}", file=sys.stderr, flush=True)
    return row


def run_all(
    n_tasks: int, n_sleep: int, repeat: int, only: list[str] | None = None, *, sizes: Sizes | None = None
) -> list[Row]:
    """Rows for the benchmarks named in ``only`` (default: all of ``BENCHES``).

    ``sizes`` overrides the sizes derived from ``n_tasks``, ``n_sleep`` and
    ``repeat``. Unknown names raise ``KeyError`` before anything runs.
    """
    names = list(BENCHES) if only is None else list(only)
    unknown = [name for name in names if name not in BENCHES]
    if unknown:
        raise KeyError(f"unknown benchmark(s) {unknown}; known: {list(BENCHES)}")
    sizes = sizes or Sizes.scaled(n_tasks, n_sleep, repeat)
    return [run_peer(name, sizes) for name in names]


NOT_MEASURED = "–"  # noqa: RUF001 (an en dash, as in the issue's tables)


def _fmt_rate(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:,.0f}"


def _fmt_time(value: float | None) -> str:
    if value is None:
        return NOT_MEASURED
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def _fmt_sleeps(row: Row) -> str:
    if row["sleeps_wall_s"] is None:
        return NOT_MEASURED
    return f"{_fmt_time(row['sleeps_wall_s'])} (n={row['sleeps_n']:,})"


TABLE_COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("system", lambda r: r["system"]),
    ("tasks/s", lambda r: _fmt_rate(r["tasks_per_s"])),
    ("p50", lambda r: _fmt_time(r["p50_s"])),
    ("p99", lambda r: _fmt_time(r["p99_s"])),
    ("sleeps wall", _fmt_sleeps),
    ("1KB tasks/s", lambda r: _fmt_rate(r["kb_tasks_per_s"])),
    ("1MB tasks/s", lambda r: _fmt_rate(r["mb_tasks_per_s"])),
    ("start", lambda r: _fmt_time(r["startup_s"])),
)


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows, then versions and notes."""
    cells = [[fmt(row) for _, fmt in TABLE_COLUMNS] for row in rows]
    headers = [name for name, _ in TABLE_COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    lines = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [line(c) for c in cells]
    lines.append("")
    lines += [f"- {row['system']}: {row['version']}" + (f" — {row['note']}" if row["note"] else "") for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where the figures were taken."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pyzmq": version_of("pyzmq"),
        "msgpack": version_of("msgpack"),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: run the benchmarks, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks per throughput run")
    parser.add_argument("--sleep-tasks", type=int, default=20_000, help="concurrent 0.5 s sleeps")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; medians are reported")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(BENCHES)}")
    parser.add_argument("--json", type=Path, help="also write the rows and machine info here")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke run: 200 tasks, 200 sleeps, 1 repeat, only {','.join(TINY_ONLY)} unless --only",
    )
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or ()) - set(BENCHES))
    if unknown:
        parser.error(f"unknown --only name(s) {unknown}; known: {','.join(BENCHES)}")
    sizes = Sizes.scaled(args.tasks, args.sleep_tasks, args.repeat)
    if args.tiny:
        sizes = replace(Sizes.scaled(200, 200, 1), sleep_budget_s=10.0)
        only = only or list(TINY_ONLY)
    begin = time.perf_counter()
    rows = run_all(sizes.tasks, sizes.sleeps, sizes.repeat, only, sizes=sizes)
    info = machine()
    print(
        f"\n{info['date']} · {info['platform']} · {info['cpus']} CPUs · Python {info['python']}"
        f" · pyzmq {info['pyzmq']} · msgpack {info['msgpack']}"
    )
    print(f"{sizes.tasks:,} tasks, {sizes.sleeps:,} sleeps, median of {sizes.repeat}\n")
    print(format_table(rows))
    print(f"\ntotal {time.perf_counter() - begin:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "sizes": asdict(sizes), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    # Run as a script this file is ``__main__``; import it by name instead so
    # the task functions pickle as ``bench_peers.inc`` for spawned workers.
    _make_importable()
    import bench_peers

    sys.exit(bench_peers.main())
