"""A fabric across test hosts: network namespaces on a private bridge (root needed; see scripts/testhosts.py).

Every component runs as a real process inside its own host (`ip netns exec`),
talking over real TCP between separate network stacks. Clients are separate
processes that print JSON on stdout. Every wait is a condition with a
deadline (a ZFABRIC-READY line, a progress line, a process exit). Without
root or namespace support every test here skips with the reason.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from netns import _hosts_impl, hosts, make_hosts_fixture, require_netns, spawn_in, th  # noqa: F401  (hosts: fixture)

PY = sys.executable  # the real interpreter: a pyenv shim costs about a second per process
APP = "zfabric.demo_tasks"
PORT = 7100

hosts4 = make_hosts_fixture(n=4, name="hosts4")  # scheduler, two worker hosts, a client host

_PREFIXES: list[str] = []  # test-host prefixes used by this module: test_cleanup checks they are gone
_SPAWNED: list[subprocess.Popen] = []  # every process this module started: test_cleanup checks they are dead


# --------------------------------------------------------------------------- programs run inside hosts

# Maps over both kinds of task, from a host of its own, with no option but the address.
CLIENT_SPREAD = r"""
import asyncio, json, sys
import zfabric
ADDRESS, N = sys.argv[1], int(sys.argv[2])
APP = "zfabric.demo_tasks"
async def main():
    async with zfabric.Client(ADDRESS) as client:
        pairs = await client.map(f"{APP}:asleep_pid", [0.001] * N, range(N))   # async tasks: [i, pid]
        where = await client.map(f"{APP}:where", [0.001] * 100)              # sync tasks: [hostname, pid]
        print(json.dumps({"sink": client.sink_address, "pairs": pairs, "where": where,
                          "duplicates": client.duplicates}), flush=True)
asyncio.run(main())
"""

# Submits N sleeping tasks, reports progress every 50 results, then every result and the scheduler's status.
CLIENT_PROGRESS = r"""
import asyncio, json, sys
import zfabric
ADDRESS, N, SECONDS = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
APP = "zfabric.demo_tasks"
async def main():
    async with zfabric.Client(ADDRESS) as client:
        handles = [client.submit(f"{APP}:asleep_pid", SECONDS, i) for i in range(N)]
        got = []
        async for h in zfabric.as_completed(handles):
            got.append(h.result())
            if len(got) % 50 == 0:
                print("PROGRESS", len(got), flush=True)
        status = await client.status()
        print(json.dumps({"results": got, "duplicates": client.duplicates,
                          "redelivered": status["redelivered"], "lost": status["lost"],
                          "workers": [w["pid"] for w in status["workers"]]}), flush=True)
asyncio.run(main())
"""

# Polls status until the worker with PID is registered (or DEADLINE s pass), then runs tasks to see it used.
CLIENT_REJOIN = r"""
import asyncio, json, sys, time
import zfabric
ADDRESS, PID, DEADLINE = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
APP = "zfabric.demo_tasks"
async def main():
    t0 = time.monotonic()
    async with zfabric.Client(ADDRESS, timeout_s=DEADLINE) as client:
        while True:
            pids = [w["pid"] for w in (await client.status())["workers"]]
            if PID in pids or time.monotonic() - t0 > DEADLINE:
                break
            await asyncio.sleep(0.1)  # sync-ok: polling interval of a deadline wait
        out = {"pids": pids, "after_s": time.monotonic() - t0}
        if PID in pids:
            out["ran_on"] = [pid for _i, pid in await client.map(f"{APP}:asleep_pid", [0.005] * 400, range(400))]
    print(json.dumps(out), flush=True)
asyncio.run(main())
"""

# Inside the scheduler's host: what answers on its own IP and on loopback, raw TCP and a zfabric client.
PROBE_BIND = r"""
import asyncio, errno, json, socket, sys, time
import zfabric
IP, PORT = sys.argv[1], int(sys.argv[2])
def tcp(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return "open"
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__)
out = {"ip": tcp(IP, PORT), "ip_workers": tcp(IP, PORT + 1),
       "loopback": tcp("127.0.0.1", PORT), "loopback_workers": tcp("127.0.0.1", PORT + 1)}
async def main():
    t0 = time.monotonic()
    try:
        async with zfabric.Client(f"tcp://127.0.0.1:{PORT}", timeout_s=1.5):
            out["client"] = "connected"
    except zfabric.FabricUnreachable as e:
        out["client"], out["message"] = "FabricUnreachable", str(e)
    out["client_s"] = time.monotonic() - t0
asyncio.run(main())
print(json.dumps(out), flush=True)
"""


# --------------------------------------------------------------------------- helpers


def start(host, argv: list[str], tmp_path: Path, label: str) -> subprocess.Popen:
    """Run argv in host: stdout is a text pipe, stderr a log file shown when an assertion fails."""
    log = tmp_path / f"{label}.log"
    with open(log, "w") as f:
        proc = spawn_in(host, argv, stdout=subprocess.PIPE, stderr=f, text=True)
    proc.log = log  # type: ignore[attr-defined]
    proc.label = f"{label} in {host}"  # type: ignore[attr-defined]
    _SPAWNED.append(proc)
    return proc


def logs(*procs: subprocess.Popen) -> str:
    return "".join(f"\n--- {p.label} (exit {p.poll()}):\n{p.log.read_text()[-2500:]}" for p in procs)


def lines(proc: subprocess.Popen, timeout: float, others: tuple = ()):
    """Yield proc's stdout lines until EOF; fail if `timeout` s pass first."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"{proc.label}: not finished within {timeout:g} s{logs(proc, *others)}")
            line = proc.stdout.readline()
            if not line:
                return
            yield line.rstrip("\n")
    finally:
        sel.close()


def wait_ready(proc: subprocess.Popen, timeout: float = 30) -> str:
    for line in lines(proc, timeout):
        if line.startswith("ZFABRIC-READY"):
            return line
    raise AssertionError(f"{proc.label} exited before it was ready{logs(proc)}")


def json_result(proc: subprocess.Popen, timeout: float, others: tuple = ()) -> dict:
    """The JSON line a client program prints last (it must exit with status 0)."""
    last = None
    for line in lines(proc, timeout, others):
        if line.startswith("{"):
            last = line
    code = proc.wait(10)
    assert code == 0 and last is not None, f"{proc.label} failed (exit {code}){logs(proc, *others)}"
    return json.loads(last)


def fabric(hosts, tmp_path: Path, worker_args: tuple[str, ...] = ()):
    """Scheduler on hosts[0] bound to its test IP, a worker on each of hosts[1:-1], all ready.

    Returns (address, {worker pid: host}, [scheduler, *worker processes])."""
    sched_host = hosts[0]
    _PREFIXES.append(sched_host.prefix)
    address = f"tcp://{sched_host.ip}:{PORT}"
    sched = start(sched_host, [PY, "-m", "zfabric", "--log-level", "info", "scheduler", "--bind", address],
                  tmp_path, "scheduler")
    wait_ready(sched)
    workers = {}
    procs = []
    for h in hosts[1:-1]:
        p = start(h, [PY, "-m", "zfabric", "--log-level", "info", "worker", address, "--app", APP, *worker_args],
                  tmp_path, f"worker-{h.index}")
        workers[p.pid] = h  # `ip netns exec` execs python itself: this pid is the worker's own
        procs.append(p)
    for p in procs:
        wait_ready(p, 60)
    return address, workers, [sched, *procs]


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(90)
def test_client_on_its_own_host_gets_every_result_from_two_worker_hosts(hosts4, tmp_path):
    address, workers, procs = fabric(hosts4, tmp_path)
    client_host = hosts4[-1]
    n = 2000
    client = start(client_host, [PY, "-c", CLIENT_SPREAD, address, str(n)], tmp_path, "client")
    out = json_result(client, 60, tuple(procs))

    # The sink bound to the client host's interface routing to the scheduler, with no option given.
    assert out["sink"].startswith(f"tcp://{client_host.ip}:"), out["sink"]
    assert [i for i, _ in out["pairs"]] == list(range(n)), "a wrong or missing value"
    ran = Counter(pid for _, pid in out["pairs"]) + Counter(pid for _, pid in out["where"])
    assert set(ran) == set(workers), f"tasks ran on {dict(ran)}; the workers are {workers}"
    for pid, h in workers.items():
        assert ran[pid] >= 100, f"the worker on {h} ran only {ran[pid]} of {n + 100} tasks: {dict(ran)}"


@pytest.mark.timeout(90)
def test_worker_host_link_cut_mid_run_loses_nothing_and_the_worker_rejoins(hosts4, tmp_path):
    # Few slots per worker and tasks that take a while, so the run lasts seconds and the cut lands mid-run.
    address, workers, procs = fabric(hosts4, tmp_path, ("--concurrency", "16"))
    (cut_pid, cut_host), (other_pid, _) = list(workers.items())
    client_host = hosts4[-1]
    n = 3000
    client = start(client_host, [PY, "-c", CLIENT_PROGRESS, address, str(n), "0.05"], tmp_path, "client")

    cut_at = None
    last = None
    for line in lines(client, 45, tuple(procs)):
        if line.startswith("PROGRESS") and cut_at is None and int(line.split()[1]) >= n * 3 // 10:
            th.link_down(cut_host)
            cut_at = int(line.split()[1])
        elif line.startswith("{"):
            last = line
    assert client.wait(10) == 0 and last, f"client failed (exit {client.poll()}){logs(client, *procs)}"
    assert cut_at is not None and cut_at < n * 9 // 10, f"the link was cut at {cut_at} of {n}"
    out = json.loads(last)

    # Every task completed exactly once at the caller, with its own value.
    values = [i for i, _ in out["results"]]
    assert len(values) == n and sorted(values) == list(range(n)), (
        f"{len(values)} results, {len(set(values))} distinct, for {n} tasks")
    ran = Counter(pid for _, pid in out["results"])
    assert set(ran) <= set(workers), f"results from unknown pids: {dict(ran)}"
    assert ran[cut_pid] > 0 and ran[other_pid] > 0, f"both workers should have run tasks: {dict(ran)}"
    # The cut worker held tasks when its link went: the scheduler declared it lost and ran them elsewhere.
    assert out["redelivered"] > 0 and out["lost"] == 0, out
    assert cut_pid not in out["workers"], f"the cut worker is still listed: {out['workers']}"
    assert procs[1 + list(workers).index(cut_pid)].poll() is None, "the cut worker died: that is not a link cut"

    # Cable back in: the worker re-registers by itself, and gets work again.
    th.link_up(cut_host)
    rejoin = start(client_host, [PY, "-c", CLIENT_REJOIN, address, str(cut_pid), "25"], tmp_path, "rejoin")
    back = json_result(rejoin, 35, tuple(procs))
    assert cut_pid in back["pids"], f"the worker on {cut_host} did not re-register within 25 s: {back}"
    assert cut_pid in back["ran_on"], f"the re-registered worker ran none of 400 tasks: {Counter(back['ran_on'])}"


@pytest.mark.timeout(90)
def test_scheduler_listens_only_on_the_address_it_was_given(hosts, tmp_path):
    address, workers, procs = fabric(hosts, tmp_path)  # scheduler on host 1's IP, worker on host 2
    sched_host, client_host = hosts[0], hosts[-1]
    [(worker_pid, _)] = workers.items()

    # From another host, the bound address works: a task runs and its result comes back.
    client = start(client_host, [PY, "-m", "zfabric", "submit", address, f"{APP}:where", "0"], tmp_path, "submit")
    printed = list(lines(client, 60, tuple(procs)))  # `zfabric submit` prints the result as JSON: [host, pid]
    assert client.wait(10) == 0 and printed, f"submit failed{logs(client, *procs)}"
    assert json.loads(printed[-1])[1] == worker_pid, printed

    # Inside the scheduler's own host, loopback is not served: nothing listens there, a client gives up.
    probe = start(sched_host, [PY, "-c", PROBE_BIND, sched_host.ip, str(PORT)], tmp_path, "probe")
    out = json_result(probe, 60, tuple(procs))
    assert out["ip"] == "open" and out["ip_workers"] == "open", out
    assert out["loopback"] == "ECONNREFUSED" and out["loopback_workers"] == "ECONNREFUSED", out
    assert out["client"] == "FabricUnreachable", out
    assert out["client_s"] < 15, out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("hosts", [2], indirect=True)
def test_up_binds_the_given_address_and_serves_other_hosts(hosts, tmp_path):
    fab_host, client_host = hosts
    _PREFIXES.append(fab_host.prefix)
    address = f"tcp://{fab_host.ip}:{PORT}"
    up = start(fab_host, [PY, "-m", "zfabric", "--log-level", "info", "up", "--workers", "1", "--app", APP,
                          "--bind", address], tmp_path, "up")
    said = next((line for line in lines(up, 60) if line.startswith("zfabric is up")), None)
    assert said and f"{address} " in said, f"`zfabric up` said {said!r}{logs(up)}"

    client = start(client_host, [PY, "-m", "zfabric", "submit", address, f"{APP}:add", "40", "2"], tmp_path, "submit")
    printed = list(lines(client, 60, (up,)))
    assert client.wait(10) == 0 and printed[-1:] == ["42"], f"submit printed {printed}{logs(client, up)}"

    probe = start(fab_host, [PY, "-c", PROBE_BIND, fab_host.ip, str(PORT)], tmp_path, "probe")
    out = json_result(probe, 60, (up,))
    assert (out["ip"], out["ip_workers"]) == ("open", "open"), out
    assert (out["loopback"], out["loopback_workers"]) == ("ECONNREFUSED", "ECONNREFUSED"), out


@pytest.mark.timeout(60)
def test_cleanup_leaves_no_namespace_and_no_process(tmp_path):
    require_netns()
    # The hosts of the tests above (if they ran) are gone, with every process started in them.
    def leftovers(prefixes):
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        return [n for n in names if any(n.startswith(p) for p in prefixes)]

    assert not leftovers(_PREFIXES), f"namespaces left behind: {leftovers(_PREFIXES)}"
    alive = [p.label for p in _SPAWNED if p.poll() is None]
    assert not alive, f"processes left running: {alive}"

    # And the fixture cleans up when a test fails inside it, too.
    gen = _hosts_impl(2, None)
    made = next(gen)  # skips here, with the reason, where namespaces cannot be made
    prefix = made[0].prefix
    sleeper = start(made[1], [PY, "-c", "import time; print('up', flush=True); time.sleep(600)"], tmp_path, "sleeper")
    assert next(lines(sleeper, 30)) == "up"
    assert leftovers([prefix])
    with pytest.raises(RuntimeError, match="a failing test"):
        gen.throw(RuntimeError("a failing test"))
    assert sleeper.poll() is not None, "a process in a test host survived the fixture's teardown"
    assert not leftovers([prefix]), f"namespaces left behind: {leftovers([prefix])}"
    ok = [h["name"] for h in th.list_hosts(prefix)]
    assert not ok, ok
