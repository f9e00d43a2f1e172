#!/usr/bin/env python3
"""What following the event stream costs: `client.map` with no follower, with one, and with 100.

    python scripts/bench_events.py [--tasks 20000] [--rounds 5]

One `zfabric up` fabric of 2 workers. Followers run in a separate process: one SUB socket that receives
the EVENTS messages without decoding them (the scheduler's own cost), one `Client.events()` reader that
decodes every event (as `zfabric events` does, without printing: on 2 cores its CPU is taken from the
fabric), or 100 SUB sockets that never read (the scheduler must drop for them). Each round maps ``--tasks`` no-op tasks under
each condition in turn and, with none and with 100 followers, times status requests made during the map. Prints
medians and ratios (issue 12's aim: one follower keeps at least 0.9x); speed is printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import zfabric
from fabric_up import fabric_up

FOLLOW_ONE = """
import asyncio, sys, zfabric
async def main():
    async with zfabric.Client(sys.argv[1]) as client:
        n = 0
        print("following", flush=True)
        async for event in client.events():
            n += 1
asyncio.run(main())
"""


def start_follower(kind: str, address: str) -> subprocess.Popen[str]:
    if kind == "one":
        code = FOLLOW_ONE
    elif kind == "raw":
        code = ("import sys, zmq, asyncio, zfabric\n"
                "async def events():\n"
                "    async with zfabric.Client(sys.argv[1]) as client:\n"
                "        return (await client.status())['events']\n"
                "where = asyncio.run(events())\n"
                "s = zmq.Context().socket(zmq.SUB); s.setsockopt(zmq.SUBSCRIBE, b''); s.connect(where)\n"
                "print('following', flush=True)\n"
                "while True:\n"
                "    s.recv()\n")
    else:
        code = ("import sys, zmq, asyncio, zfabric, time\n"
                "async def events():\n"
                "    async with zfabric.Client(sys.argv[1]) as client:\n"
                "        return (await client.status())['events']\n"
                "where = asyncio.run(events())\n"
                "ctx = zmq.Context()\n"
                "socks = [ctx.socket(zmq.SUB) for _ in range(100)]\n"
                "for s in socks:\n"
                "    s.setsockopt(zmq.SUBSCRIBE, b''); s.connect(where)\n"
                "print('following', flush=True)\n"
                "time.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, address], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


async def followed(client: zfabric.Client, want: bool) -> None:
    deadline = time.monotonic() + 20
    while (await client.status())["events_followed"] is not want:
        if time.monotonic() > deadline:
            raise RuntimeError("the scheduler did not see the followers come or go")
        await asyncio.sleep(0.05)  # polling the fabric's own status: a benchmark, not a test


async def measure(address: str, tasks: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    rates: dict[str, list[float]] = {"none": [], "raw": [], "one": [], "crowd": []}
    status_ms: dict[str, list[float]] = {"none": [], "crowd": []}
    async with zfabric.Client(address) as client:
        await client.map("zfabric.demo_tasks:inc", range(2000))
        for round_no in range(rounds):
            for kind in rates:
                follower = None if kind == "none" else start_follower(kind, address)
                await followed(client, follower is not None)
                started = time.perf_counter()
                await client.map("zfabric.demo_tasks:inc", range(tasks))
                rates[kind].append(tasks / (time.perf_counter() - started))
                if kind in status_ms:  # then a map of its own for status requests made during it
                    mapping = asyncio.ensure_future(client.map("zfabric.demo_tasks:inc", range(tasks)))
                    while not mapping.done():
                        asked = time.perf_counter()
                        await client.status()
                        status_ms[kind].append((time.perf_counter() - asked) * 1000)
                    await mapping
                if follower is not None:
                    follower.kill()
                    follower.wait()
            print(f"[bench] round {round_no + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()),
                  file=sys.stderr)
    return rates, status_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with fabric_up() as address:
        rates, status_ms = asyncio.run(measure(address, args.tasks, args.rounds))
    none = statistics.median(rates["none"])
    for kind, label in (("raw", "one follower receiving (not decoding)"), ("one", "one follower decoding every event"),
                        ("crowd", "100 followers not reading")):
        rate = statistics.median(rates[kind])
        print(f"{label}: {rate:,.0f} tasks/s against {none:,.0f} without: {rate / none:.2f}x")
    for kind, label in (("none", "no follower"), ("crowd", "100 followers")):
        if status_ms[kind]:
            print(f"status during the map, {label}: p50 {statistics.median(status_ms[kind]):.1f} ms, "
                  f"max {max(status_ms[kind]):.1f} ms ({len(status_ms[kind])} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
