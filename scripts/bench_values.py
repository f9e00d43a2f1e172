"""What typed values cost: a map of (int, aware datetime, str) tuples against the same data as plain lists.

    python scripts/bench_values.py

20,000 `echo` tasks on a local 2-worker fabric, 4 alternating rounds, medians; prints both rates and their
ratio (the issue's aim: typed at no more than 1.3x the cost of plain msgpack). Speed is printed, never asserted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import time

from zfabric import local

T0 = dt.datetime(2026, 12, 2, tzinfo=dt.timezone.utc)
N = 20_000


async def main() -> None:
    typed = [(i, T0 + dt.timedelta(seconds=i), "x") for i in range(N)]
    plain = [[i, (T0 + dt.timedelta(seconds=i)).isoformat(), "x"] for i in range(N)]
    rates: dict[str, list[float]] = {"plain": [], "typed": []}
    async with local(workers=2, app=["zfabric.demo_tasks"]) as client:
        await client.map("zfabric.demo_tasks:echo", plain[:2000])
        for _ in range(4):
            for name, data in (("plain", plain), ("typed", typed)):
                started = time.perf_counter()
                assert await client.map("zfabric.demo_tasks:echo", data) == data
                rates[name].append(N / (time.perf_counter() - started))
    plain_rate, typed_rate = statistics.median(rates["plain"]), statistics.median(rates["typed"])
    print(f"plain lists {plain_rate:,.0f} tasks/s, typed tuples {typed_rate:,.0f} tasks/s: "
          f"typed values cost {plain_rate / typed_rate:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
