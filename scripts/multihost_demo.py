#!/usr/bin/env python3
"""A zfabric spread over N test hosts on one Linux machine (root needed).

Creates N test hosts with scripts/testhosts.py (network namespaces on a
private bridge, 10.231.0.0/24, host i = 10.231.0.(10+i)), then runs::

    host 1          python -m zfabric scheduler --bind tcp://10.231.0.11:7100
    hosts 2..N-1    python -m zfabric worker tcp://10.231.0.11:7100 --app zfabric.demo_tasks
    host N          a client: zfabric.Client("tcp://10.231.0.11:7100"), no other option

The client runs `zfabric.demo_tasks:where` tasks (to show where tasks ran),
a no-op throughput run (`inc` over --tasks items) and one-at-a-time round
trips; this script prints, per worker host, its IP, the worker's pid and how
many tasks it ran, then the throughput and the round-trip latency.

Everything is torn down on exit, also on Ctrl-C, SIGTERM or an error: the
processes first, then the namespaces (which kills anything left inside).

    sudo python scripts/multihost_demo.py                     # 4 hosts, 20,000 tasks
    sudo python scripts/multihost_demo.py --hosts 6 --delay-ms 5

``--delay-ms D`` adds D ms of one-way delay to every host link with
``tc netem`` when the kernel has it (sch_netem); otherwise it says so and runs
without delay.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import testhosts as th  # noqa: E402

PY = sys.executable  # the real interpreter: a pyenv shim would cost a second per process
APP = "zfabric.demo_tasks"
PORT = 7100
READY = "ZFABRIC-READY"

# The client: runs in host N, knows only the scheduler's address.
CLIENT = r"""
import asyncio, json, statistics, sys, time
import zfabric

ADDRESS, N_TASKS, N_WHERE, N_RTT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
APP = "zfabric.demo_tasks"

def say(text):
    print(text, file=sys.stderr, flush=True)

async def main():
    t0 = time.perf_counter()
    async with zfabric.Client(ADDRESS) as client:          # no other option: the sink finds its own address
        out = {"connect_s": time.perf_counter() - t0, "sink": client.sink_address}
        say(f"  client connected in {out['connect_s']:.2f} s; results come back to its sink at {client.sink_address}")

        where = await client.map(f"{APP}:where", [0.002] * N_WHERE)
        out["where_pids"] = [pid for _host, pid in where]

        say(f"  throughput run: {N_TASKS:,} no-op tasks ...")
        t = time.perf_counter()
        last = None
        done = 0
        async for value in client.imap(f"{APP}:inc", range(N_TASKS)):
            last = value
            done += 1
            if done % (max(1, N_TASKS // 4)) == 0:
                say(f"    {done:>8,}/{N_TASKS:,} results")
        out["noop_s"] = time.perf_counter() - t
        assert last == N_TASKS, f"map returned {last!r} last, expected {N_TASKS}"

        say(f"  round trips: {N_RTT} tasks, one at a time ...")
        samples = []
        for i in range(N_RTT):
            t = time.perf_counter()
            assert await client.submit(f"{APP}:inc", i) == i + 1
            samples.append(time.perf_counter() - t)
        samples.sort()
        out["rtt_p50_us"] = statistics.median(samples) * 1e6
        out["rtt_p99_us"] = samples[min(len(samples) - 1, int(0.99 * len(samples)))] * 1e6

        status = await client.status()
        out["status_workers"] = [{k: w[k] for k in ("name", "pid", "done")} for w in status["workers"]]
        out["duplicates"] = client.duplicates
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def _read_ready(proc: subprocess.Popen, what: str, timeout: float) -> str:
    """Wait for the process's ZFABRIC-READY line on stdout; fail with its stderr if it exits first."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{what} did not report ready within {timeout:g} s")
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{what} exited (code {proc.wait()}) before it was ready:\n{_log_tail(proc)}")
            if line.startswith(READY):
                return line[len(READY):].strip()
    finally:
        sel.close()


def _log_tail(proc: subprocess.Popen, chars: int = 3000) -> str:
    log = getattr(proc, "log", None)
    if log is None:
        return ""
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process (workers drain), then SIGKILL whatever is left after a deadline."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait(5)
    for p in procs:
        for f in (p.stdout, p.stderr, getattr(p, "log", None)):
            if f is not None:
                f.close()


def _spawn(host: th.Host, argv: list[str], *, logged: bool = True, **kw) -> subprocess.Popen:
    """Start argv in host. Its own session: Ctrl-C reaches only this script, which stops the children in
    order. With `logged`, stderr goes to a temporary file (shown if the process fails), never to a pipe
    nobody reads."""
    log = tempfile.TemporaryFile("w+") if logged else None
    if log is not None:
        kw["stderr"] = log
    proc = subprocess.Popen(th.host_exec_argv(host, argv), stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True, **kw)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def run(args: argparse.Namespace) -> int:
    ok, reason = th.netns_available()
    if not ok:
        print(f"multihost_demo: cannot create test hosts: {reason}", file=sys.stderr)
        return 2
    delay = args.delay_ms
    if delay:
        ok, why = th.netem_available()
        if not ok:
            print(f"multihost_demo: link delay unavailable ({why}); running WITHOUT added delay", flush=True)
            delay = None
    procs: list[subprocess.Popen] = []
    t_start = time.perf_counter()
    with th.TestHosts(args.hosts, delay_ms=delay) as hosts:
        try:
            sched_host, worker_hosts, client_host = hosts[0], list(hosts[1:-1]), hosts[-1]
            address = f"tcp://{sched_host.ip}:{PORT}"
            lat = f", {delay:g} ms one-way delay per link" if delay else ", no added delay"
            print(f"zfabric across {len(hosts)} test hosts (network namespaces on a private bridge{lat})",
                  flush=True)
            for h in hosts:
                role = ("scheduler" if h is sched_host else "client" if h is client_host else "worker")
                print(f"  {h.name:<16} {h.ip:<13} {role}", flush=True)

            sched = _spawn(sched_host, [PY, "-m", "zfabric", "--log-level", args.log_level, "scheduler",
                                        "--bind", address], stdout=subprocess.PIPE)
            procs.append(sched)
            _read_ready(sched, f"scheduler in {sched_host}", 30)
            print(f"  scheduler listening on {address} (workers on port {PORT + 1})", flush=True)

            workers: dict[int, th.Host] = {}
            starting = []
            for h in worker_hosts:
                p = _spawn(h, [PY, "-m", "zfabric", "--log-level", args.log_level, "worker", address,
                               "--app", APP], stdout=subprocess.PIPE)
                procs.append(p)
                starting.append((p, h))
                workers[p.pid] = h  # `ip netns exec` execs python itself: this is the worker's pid
            for p, h in starting:
                _read_ready(p, f"worker in {h}", 60)
            print(f"  {len(workers)} workers joined from {', '.join(h.ip for h in worker_hosts)} "
                  f"(set up in {time.perf_counter() - t_start:.1f} s)", flush=True)

            n_where = 50 * len(worker_hosts)
            client = _spawn(client_host, [PY, "-c", CLIENT, address, str(args.tasks), str(n_where), str(args.rtt)],
                            stdout=subprocess.PIPE, logged=False)  # its progress (stderr) goes to ours
            procs.append(client)
            try:
                out, _ = client.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"the client did not finish within {args.timeout:g} s") from None
            if client.returncode != 0 or not out.strip():
                logs = "".join(f"\n--- {h.name} worker log:\n{_log_tail(p, 1500)}" for p, h in starting)
                raise RuntimeError(f"the client failed (exit {client.returncode}); scheduler log:\n"
                                   f"{_log_tail(sched, 1500)}{logs}")
            res = json.loads(out.strip().splitlines()[-1])

            ran = Counter(res["where_pids"])
            done_by = {w["pid"]: w["done"] for w in res["status_workers"]}
            print(f"\nWhere tasks ran ({n_where} `where` tasks from the client on {client_host.ip}; "
                  f"results straight back to its sink {res['sink']})")
            print(f"  {'host':<16} {'ip':<13} {'worker pid':>10} {'where tasks':>12} {'all tasks':>10}")
            for pid, h in workers.items():
                print(f"  {h.name:<16} {h.ip:<13} {pid:>10} {ran.get(pid, 0):>12} {done_by.get(pid, 0):>10}")
            strangers = set(ran) - set(workers)
            if strangers:
                print(f"  (unexpected worker pids: {sorted(strangers)})")
            n = args.tasks
            print("\nSummary")
            print(f"  throughput   {n / res['noop_s']:>10,.0f} no-op tasks/s  ({n:,} tasks, "
                  f"{len(workers)} workers on {len(workers)} hosts, client on a host of its own{lat})")
            print(f"  latency      p50 {res['rtt_p50_us']:,.0f} us   p99 {res['rtt_p99_us']:,.0f} us  "
                  f"({args.rtt} round trips, one task at a time)")
            print(f"  duplicates dropped at the sink: {res['duplicates']}")
            return 0
        finally:
            _stop_all(procs)
            print(f"  torn down: {len(procs)} processes stopped, {len(hosts)} test hosts removed", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=4, help="test hosts (>= 3): scheduler, workers, client")
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks in the throughput run")
    parser.add_argument("--delay-ms", type=float, default=None,
                        help="one-way delay added to every host link with tc netem (if available)")
    parser.add_argument("--rtt", type=int, default=300, help="one-at-a-time round trips for the latency figure")
    parser.add_argument("--timeout", type=float, default=300, help="give up if the client takes longer (s)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="log level of the scheduler and workers")
    args = parser.parse_args(argv)
    if args.hosts < 3:
        parser.error("--hosts must be at least 3 (a scheduler, a worker, a client)")
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C tears down even if started with SIGINT ignored
    try:
        return run(args)
    except KeyboardInterrupt:
        print("multihost_demo: interrupted; everything was torn down", file=sys.stderr)
        return 130
    except Interrupted as exc:
        print(f"multihost_demo: stopped by {exc}; everything was torn down", file=sys.stderr)
        return 143
    except (RuntimeError, th.TestHostsError) as exc:
        print(f"multihost_demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
