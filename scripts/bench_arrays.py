#!/usr/bin/env python3
"""An 8 MB numpy array's round trip: zfabric against the raw pyzmq ceiling of the same shape.

    python scripts/bench_arrays.py [--mb 8] [--tasks 60] [--rounds 3]

Each round runs, in fresh interpreters, a zfabric local fabric (2 workers) echoing ``--tasks`` distinct
float64 arrays of ``--mb`` MB (`client.map` of `zfabric.demo_tasks:echo`), and the raw pyzmq pipeline of
`bench_raw_pyzmq.py` echoing bytes of the same size (no codec, no checks: the ceiling). Prints the
median rates and their ratio (issue 11's aim: at least 0.8x). Speed is printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def zfabric_rate(mb: float, tasks: int) -> float:
    import numpy

    from zfabric import local

    n = int(mb * 1024 * 1024) // 8
    arrays = [numpy.full(n, float(i)) for i in range(tasks)]

    async def run() -> float:
        async with local(workers=2, app=["zfabric.demo_tasks"]) as client:
            await client.map("zfabric.demo_tasks:echo", arrays[:2])
            started = time.perf_counter()
            out = await client.map("zfabric.demo_tasks:echo", arrays, window=8)
            elapsed = time.perf_counter() - started
            assert all(a[0] == float(i) and a.shape == (n,) for i, a in enumerate(out))
            return tasks / elapsed
    return asyncio.run(run())


def raw_rate(mb: float, tasks: int) -> float:
    sys.path.insert(0, HERE)
    import bench_peers
    from bench_raw_pyzmq import MIN_WINDOW, RawFabric

    size = int(mb * 1024 * 1024)
    blobs = [bytes([i % 256]) * size for i in range(tasks)]

    async def run() -> float:
        fabric = RawFabric(window=MIN_WINDOW)
        await fabric.start()
        try:
            await fabric.map(bench_peers.echo, blobs[:2])
            started = time.perf_counter()
            out = await fabric.map(bench_peers.echo, blobs)
            elapsed = time.perf_counter() - started
            assert all(len(b) == size for b in out)
            return tasks / elapsed
        finally:
            await fabric.stop()
    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=8.0)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=["zfabric", "raw"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        rate = (zfabric_rate if args.one == "zfabric" else raw_rate)(args.mb, args.tasks)
        print(json.dumps(rate))
        return 0
    rates: dict[str, list[float]] = {"zfabric": [], "raw": []}
    for round_no in range(1, args.rounds + 1):
        for system in rates:
            out = subprocess.run([sys.executable, __file__, "--one", system, "--mb", str(args.mb),
                                  "--tasks", str(args.tasks)], capture_output=True, text=True, check=True)
            rates[system].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"[bench] round {round_no}: {system} {rates[system][-1]:,.1f} arrays/s", file=sys.stderr)
    zf, raw = statistics.median(rates["zfabric"]), statistics.median(rates["raw"])
    print(f"{args.mb:g} MB float64 array round trips: zfabric {zf:,.1f}/s, raw pyzmq ceiling (bytes) {raw:,.1f}/s: "
          f"{zf / raw:.2f}x the ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
