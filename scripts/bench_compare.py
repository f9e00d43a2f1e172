"""zfabric beside its peers, in one run: throughput, latency, concurrency, memory, payloads.

    python scripts/bench_compare.py                  # full run (several minutes on 2 cores)
    python scripts/bench_compare.py --tiny           # a smoke run (the test suite runs this)
    python scripts/bench_compare.py --only pool1,dask --repeat 1

Peers come from scripts/bench_peers.py (ProcessPoolExecutor, Dask, ipyparallel,
Ray where installed, and a raw pyzmq pipeline of zfabric's own shape as the
ceiling); install them with `pip install -e '.[bench]'`. zfabric's figures come
from `zfabric.bench` (also `zfabric bench`). The run is --repeat rounds, each
measuring zfabric and then every peer once, each in a fresh interpreter, so
that every system sees the machine in the same moods (a shared VM's latency
drifts by 2-3x from minute to minute) and none runs in a process another has
been through; each figure is the median over the rounds. The table is followed by
ratios and by the floors of the Performance issue.
Speed is never asserted here: the floors are printed, not enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, HERE)

import bench_peers  # noqa: E402  (a script next to this one)



def fresh(imports: str, expression: str) -> Any:
    """Evaluate `expression` in a fresh interpreter and return its value (through JSON in a file: peers
    print to stdout): no system is measured in a process another system's threads, sockets or heap have
    been through."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        code = f"import json; {imports}\nwith open({out!r}, 'w') as f: json.dump({expression}, f, default=str)"
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        with open(out) as f:
            return json.load(f)


def zfabric_run(sizes: bench_peers.Sizes, pending: int, tiny: bool) -> dict[str, Any]:
    print("[bench] zfabric ...", file=sys.stderr, flush=True)
    args = (2, sizes.tasks, sizes.sleeps, sizes.latency_samples * 3, pending)
    return fresh("import asyncio; from zfabric.bench import run_bench",  # type: ignore[no-any-return]
                 f"asyncio.run(run_bench(*{args!r}, quick={tiny!r}))")


def peer_run(name: str, once: bench_peers.Sizes) -> bench_peers.Row:
    return fresh("import bench_peers",  # type: ignore[no-any-return]
                 f"bench_peers.run_peer({name!r}, bench_peers.Sizes(**{asdict(once)!r}))")


def zfabric_row(runs: list[dict[str, Any]]) -> bench_peers.Row:
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0] if isinstance(runs[0][key], float)}
    row = bench_peers.make_row(
        "zfabric (2 workers)", bench_peers.version_of("zfabric"),
        note=f"{med['bytes_per_pending']:.0f} B RSS (client+scheduler) per pending task, "
             f"{runs[0]['pending_tasks']:,} pending",
        tasks_per_s=med["tasks_per_s"], p50_s=med["p50_us"] / 1e6, p99_s=med["p99_us"] / 1e6,
        sleeps_wall_s=med["sleep_wall_s"], sleeps_n=runs[0]["sleep_tasks"],
        kb_tasks_per_s=med["kb_tasks_per_s"], mb_tasks_per_s=med["mb_tasks_per_s"], startup_s=med["startup_s"])
    row["bytes_per_pending"] = med["bytes_per_pending"]
    return row


def median_row(rows: list[bench_peers.Row]) -> bench_peers.Row:
    """One row per peer: the median of each figure over the rounds that measured it."""
    row = dict(rows[0])
    for key, value in rows[0].items():
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if isinstance(value, (int, float)) and values:
            row[key] = statistics.median(values)
    return row


def interleaved(sizes: bench_peers.Sizes, only: list[str], pending: int,
                tiny: bool) -> tuple[bench_peers.Row, dict[str, bench_peers.Row]]:
    """zfabric's row and each peer's, from `sizes.repeat` rounds that each run every system once."""
    once = replace(sizes, repeat=1)
    zf_runs: list[dict[str, Any]] = []
    peer_runs: dict[str, list[bench_peers.Row]] = {name: [] for name in only}
    for round_no in range(1, sizes.repeat + 1):
        print(f"[bench] round {round_no} of {sizes.repeat}", file=sys.stderr, flush=True)
        zf_runs.append(zfabric_run(sizes, pending, tiny))
        for name in only:
            peer_runs[name].append(peer_run(name, once))
    return zfabric_row(zf_runs), {name: median_row(rows) for name, rows in peer_runs.items()}


def ratios(zf: bench_peers.Row, rows: dict[str, bench_peers.Row]) -> list[str]:
    out = []
    for name, row in rows.items():
        parts = []
        if row.get("tasks_per_s"):
            parts.append(f"throughput {zf['tasks_per_s'] / row['tasks_per_s']:.1f}x")
        if row.get("p50_s"):
            parts.append(f"p50 {row['p50_s'] / zf['p50_s']:.1f}x lower")
        if row.get("sleeps_wall_s") and row.get("sleeps_n"):
            peer_rate = row["sleeps_n"] / row["sleeps_wall_s"]
            parts.append(f"sleeps/s {zf['sleeps_n'] / zf['sleeps_wall_s'] / peer_rate:.1f}x")
        if row.get("mb_tasks_per_s"):
            parts.append(f"1 MB args {zf['mb_tasks_per_s'] / row['mb_tasks_per_s']:.2f}x")
        if parts:
            out.append(f"- zfabric vs {row['system']}: " + ", ".join(parts))
    return out


def floors(zf: bench_peers.Row, rows: dict[str, bench_peers.Row]) -> list[str]:
    checks = []

    def check(what: str, ok: bool, detail: str) -> None:
        checks.append(f"- [{'x' if ok else ' '}] {what}: {detail}")

    if rows.get("pool1", {}).get("tasks_per_s"):
        r = zf["tasks_per_s"] / rows["pool1"]["tasks_per_s"]
        check("throughput >= 2x ProcessPoolExecutor(chunksize=1)", r >= 2, f"{r:.1f}x")
    if rows.get("dask", {}).get("tasks_per_s"):
        r = zf["tasks_per_s"] / rows["dask"]["tasks_per_s"]
        check("throughput >= 30x Dask", r >= 30, f"{r:.0f}x")
    if rows.get("dask", {}).get("p50_s"):
        r = rows["dask"]["p50_s"] / zf["p50_s"]
        check("p50 <= 1/15 of Dask's", r >= 15, f"1/{r:.1f}")
    if zf["sleeps_n"] >= 20_000:
        check("20,000 sleeps within 1.5 s", zf["sleeps_wall_s"] <= 1.5, f"{zf['sleeps_wall_s']:.2f} s (aim 0.8 s)")
    check("memory per pending task <= 1 KB", zf["bytes_per_pending"] <= 1024,
          f"{zf['bytes_per_pending']:.0f} B (aim 300 B)")
    check("aim: 100,000 tasks/s", zf["tasks_per_s"] >= 100_000, f"{zf['tasks_per_s']:,.0f}/s")
    check("aim: p50 300 µs", zf["p50_s"] <= 300e-6, f"{zf['p50_s'] * 1e6:.0f} µs")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--sleep-tasks", type=int, default=20_000)
    parser.add_argument("--pending", type=int, default=200_000, help="tasks pending for the memory figure")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", help=f"peers to run, comma-separated subset of {','.join(bench_peers.BENCHES)}")
    parser.add_argument("--tiny", action="store_true", help="a smoke run with tiny counts")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args(argv)
    sizes = bench_peers.Sizes.scaled(args.tasks, args.sleep_tasks, args.repeat)
    only = args.only.split(",") if args.only else list(bench_peers.BENCHES)
    pending = args.pending
    if args.tiny:
        sizes = replace(bench_peers.Sizes.scaled(200, 200, 1), sleep_budget_s=10.0)
        only = args.only.split(",") if args.only else list(bench_peers.TINY_ONLY)
        pending = 2_000
    begin = time.perf_counter()
    zf, peers = interleaved(sizes, only, pending, args.tiny)
    info = bench_peers.machine()
    print(f"\n{info['date']} · {info['platform']} · {info['cpus']} CPUs · Python {info['python']}"
          f" · pyzmq {info['pyzmq']} · msgpack {info['msgpack']}")
    print(f"{sizes.tasks:,} no-op tasks, {sizes.sleeps:,} sleeps, median of {sizes.repeat} interleaved rounds\n")
    print(bench_peers.format_table([zf, *peers.values()]))
    print("\nRatios (zfabric / peer):")
    print("\n".join(ratios(zf, peers)))
    print("\nFloors and aims of the Performance issue:")
    print("\n".join(floors(zf, peers)))
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": [zf, *peers.values()]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
