#!/usr/bin/env python3
"""What routing costs: `client.map` of no-op tasks, plain against routed by a tag and by a resource.

    python scripts/bench_routing.py [--tasks 20000] [--rounds 5]

One `zfabric up` fabric of 2 workers started with ``--tag gpu --resources slot=100000`` (so every task can
run on every worker and only the routing work differs); each round maps ``--tasks`` `inc` tasks plain,
with ``tags=["gpu"]`` and with ``resources={"slot": 1}``, in turn. Prints medians and ratios; speed is
printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import zfabric
from fabric_up import fabric_up


async def measure(address: str, tasks: int, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"plain": [], "tags": [], "resources": []}
    async with zfabric.Client(address) as client:
        ways = {"plain": client.options(), "tags": client.options(tags=["gpu"]),
                "resources": client.options(resources={"slot": 1})}
        await client.map("zfabric.demo_tasks:inc", range(2000))
        for round_no in range(rounds):
            for name, submitter in ways.items():
                started = time.perf_counter()
                out = await submitter.map("zfabric.demo_tasks:inc", range(tasks))
                rates[name].append(tasks / (time.perf_counter() - started))
                assert out[-1] == tasks
            print(f"[bench] round {round_no + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()),
                  file=sys.stderr)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with fabric_up("--tag", "gpu", "--resources", "slot=100000") as address:
        rates = asyncio.run(measure(address, args.tasks, args.rounds))
    plain = statistics.median(rates["plain"])
    for name in ("tags", "resources"):
        routed = statistics.median(rates[name])
        print(f"{name:>9}: {routed:,.0f} tasks/s against {plain:,.0f} plain: {routed / plain:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
