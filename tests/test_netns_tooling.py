"""The test-host tooling itself (scripts/testhosts.py, tests/netns.py).

Real namespaces, real sockets; every wait is a condition with a deadline.
Traffic goes only to loopback and to addresses inside our own namespaces.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys

import pytest

from netns import hosts, kill_all, require_netns, spawn_in, th, wait_until  # noqa: F401  (hosts: fixture)

PY = sys.executable

# An echo server: binds (HOST, 0), prints "READY <port>", then echoes
# "<tag>:<data>" back on every connection, forever.
ECHO_SERVER = r"""
import socket, sys
host, tag = sys.argv[1], sys.argv[2].encode()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, 0))
s.listen(64)
print("READY", s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.settimeout(5)
        data = c.recv(4096)
        c.sendall(tag + b":" + data)
"""

# A client: connects with a timeout, sends a token, prints "OK <reply>" or
# "ERR <exception type> <errno name>". Exit status 0 only on OK.
ECHO_CLIENT = r"""
import errno, socket, sys
ip, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((ip, port), timeout=timeout) as c:
        c.sendall(b"ping")
        print("OK", c.recv(4096).decode(), flush=True)
except OSError as e:
    print("ERR", type(e).__name__, errno.errorcode.get(e.errno, e.errno), flush=True)
    sys.exit(1)
"""


def start_echo_server(host, bind_ip: str, tag: str = "srv") -> tuple[subprocess.Popen, int]:
    proc = spawn_in(host, [PY, "-c", ECHO_SERVER, bind_ip, tag], stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    assert ready, f"echo server in {host} did not report READY within 15s"
    line = proc.stdout.readline().split()
    assert line[:1] == ["READY"], f"echo server in {host} said {line!r} (exit {proc.poll()})"
    return proc, int(line[1])


def echo(host, ip: str, port: int, timeout: float = 2.0) -> str:
    """Run the client inside ``host``; returns its one-line verdict ("OK ..." / "ERR ...")."""
    cp = subprocess.run(
        th.host_exec_argv(host, [PY, "-c", ECHO_CLIENT, ip, str(port), str(timeout)]),
        capture_output=True, text=True, timeout=timeout + 20,
    )
    out = cp.stdout.strip()
    assert out.startswith(("OK", "ERR")), f"client in {host} failed: {cp.stderr.strip()}"
    return out


def root_snapshot() -> dict:
    def run(*args):
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    links = [line.split(":", 2)[1].strip().split("@")[0] for line in run("-o", "link", "show").splitlines()]
    return {
        "addr": run("-o", "addr", "show"),
        "route": run("route", "show", "table", "all"),
        "route6": run("-6", "route", "show", "table", "all"),
        "links": sorted(links),
    }


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def assert_nothing_left(prefix: str) -> None:
    assert [n for n in netns_names() if n.startswith(prefix)] == []
    assert [link for link in root_snapshot()["links"] if link.startswith(prefix)] == []


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(60)
def test_hosts_have_addresses_and_only_their_subnet(hosts):
    assert [h.index for h in hosts] == [1, 2, 3]
    assert [h.ip for h in hosts] == ["10.231.0.11", "10.231.0.12", "10.231.0.13"]
    for h in hosts:
        addrs = subprocess.run(["ip", "-n", h.name, "-o", "-4", "addr", "show"],
                               capture_output=True, text=True, check=True).stdout
        assert "inet 127.0.0.1/8" in addrs and f"inet {h.ip}/24" in addrs
        routes = subprocess.run(["ip", "-n", h.name, "-4", "route", "show"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
        # no default route: a host can reach the test subnet and its own loopback, nothing else
        assert [r.strip() for r in routes] == [f"10.231.0.0/24 dev {h.veth} proto kernel scope link src {h.ip}"]


@pytest.mark.timeout(60)
def test_hosts_reach_each_other(hosts):
    h1, h2, h3 = hosts
    _, port = start_echo_server(h1, h1.ip, tag="h1")
    assert echo(h2, h1.ip, port) == "OK h1:ping"
    assert echo(h3, h1.ip, port) == "OK h1:ping"
    _, port3 = start_echo_server(h3, "0.0.0.0", tag="h3")
    assert echo(h1, h3.ip, port3) == "OK h3:ping"


@pytest.mark.timeout(60)
def test_loopback_is_private_to_each_host(hosts):
    h1, h2, _ = hosts
    _, port = start_echo_server(h1, "127.0.0.1", tag="h1lo")
    assert echo(h1, "127.0.0.1", port) == "OK h1lo:ping"  # lo is up inside the host
    # h2's 127.0.0.1 is h2's own loopback: nothing listens there
    assert echo(h2, "127.0.0.1", port) == "ERR ConnectionRefusedError ECONNREFUSED"
    # and h1's loopback-bound server is not reachable on h1's test address
    assert echo(h2, h1.ip, port) == "ERR ConnectionRefusedError ECONNREFUSED"

    # nor is the root namespace's loopback reachable from a host
    with socket.socket() as root_srv:
        root_srv.bind(("127.0.0.1", 0))
        root_srv.listen(1)
        root_port = root_srv.getsockname()[1]
        assert echo(h2, "127.0.0.1", root_port) == "ERR ConnectionRefusedError ECONNREFUSED"


@pytest.mark.timeout(60)
def test_link_down_cuts_host_and_link_up_restores_it(hosts):
    h1, h2, h3 = hosts
    server, port = start_echo_server(h1, h1.ip, tag="h1")
    assert echo(h2, h1.ip, port) == "OK h1:ping"

    th.link_down(h1)
    state = subprocess.run(["ip", "-n", h1.name, "-o", "link", "show", h1.veth],
                           capture_output=True, text=True, check=True).stdout
    assert "state DOWN" in state
    # peers' packets are dropped (timeout) or, once ARP gives up, unreachable
    verdict = echo(h2, h1.ip, port, timeout=1.0)
    assert verdict.startswith("ERR") and verdict.split()[1:] in (["TimeoutError", "None"], ["OSError", "EHOSTUNREACH"]), verdict
    # the cut host itself has lost its route to the subnet
    assert echo(h1, h3.ip, 9, timeout=1.0) == "ERR OSError ENETUNREACH"
    # the other hosts still reach each other
    _, port3 = start_echo_server(h3, h3.ip, tag="h3")
    assert echo(h2, h3.ip, port3) == "OK h3:ping"

    th.link_up(h1)
    wait_until(lambda: echo(h2, h1.ip, port, timeout=1.0) == "OK h1:ping", 20, "h1 reachable again")
    assert server.poll() is None  # the process in the host survived the cut


@pytest.mark.timeout(60)
def test_same_addresses_in_two_concurrent_sets_do_not_collide(hosts):
    # A second, independent set with the same subnet (as a concurrent test run would make)
    with th.TestHosts(2) as other:
        assert other.prefix != hosts[0].prefix
        assert other[0].ip == hosts[0].ip
        _, port_a = start_echo_server(hosts[0], hosts[0].ip, tag="A")
        _, port_b = start_echo_server(other[0], other[0].ip, tag="B")
        assert echo(hosts[1], hosts[0].ip, port_a) == "OK A:ping"
        assert echo(other[1], other[0].ip, port_b) == "OK B:ping"
        # set B cannot see set A's server, even at the same address
        assert echo(other[1], hosts[0].ip, port_a, timeout=1.0).startswith("ERR")
        kill_all(host=other[0])
    assert_nothing_left(other.prefix)


@pytest.mark.timeout(60)
def test_destroy_removes_everything_and_root_namespace_is_unchanged():
    require_netns()
    before = root_snapshot()
    prefix = th.unique_prefix()
    with th.TestHosts(3, prefix=prefix) as hs:
        assert sorted(n for n in netns_names() if n.startswith(prefix)) == sorted(
            [f"{prefix}1", f"{prefix}2", f"{prefix}3", f"{prefix}br"])
        assert root_snapshot() == before  # nothing in the root namespace, even while up
        # a process left running inside a host must not keep it alive
        lingering = spawn_in(hs[1], [PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        assert lingering.poll() is None
    lingering.wait(timeout=10)  # destroy SIGKILLed it
    assert lingering.returncode == -9
    kill_all([lingering])
    assert_nothing_left(prefix)
    assert root_snapshot() == before
    assert th.destroy_hosts(prefix) == []  # idempotent


@pytest.mark.timeout(60)
def test_context_manager_cleans_up_on_exception():
    require_netns()
    prefix = th.unique_prefix()
    with pytest.raises(RuntimeError, match="boom"):
        with th.TestHosts(2, prefix=prefix):
            assert f"{prefix}2" in netns_names()
            raise RuntimeError("boom")
    assert_nothing_left(prefix)


@pytest.mark.timeout(60)
def test_failed_creation_removes_what_it_made(monkeypatch):
    require_netns()
    prefix = th.unique_prefix()
    real_ip = th._ip

    def failing_ip(*args, **kw):
        if args[:1] == ("-n",) and args[1] == f"{prefix}2" and "addr" in args:
            raise th.TestHostsError("injected failure")
        return real_ip(*args, **kw)

    monkeypatch.setattr(th, "_ip", failing_ip)
    with pytest.raises(th.TestHostsError, match="injected"):
        th.create_hosts(3, prefix)
    monkeypatch.undo()
    assert_nothing_left(prefix)

    # a partial set made by hand (as a crash would leave it) goes too, twice over
    subprocess.run(["ip", "netns", "add", f"{prefix}br"], check=True)
    subprocess.run(["ip", "netns", "add", f"{prefix}1"], check=True)
    assert sorted(th.destroy_hosts(prefix)) == sorted([f"{prefix}1", f"{prefix}br"])
    assert th.destroy_hosts(prefix) == []
    assert_nothing_left(prefix)


@pytest.mark.timeout(60)
def test_refuses_an_existing_prefix(hosts):
    with pytest.raises(th.TestHostsError, match="already exist"):
        th.create_hosts(2, hosts[0].prefix)
    assert echo(hosts[1], hosts[0].ip, 9, timeout=1.0) == "ERR ConnectionRefusedError ECONNREFUSED"


def test_prefix_validation():
    for bad in ("", "x" * 12, "zt1", "a/b", "a b", "a:b"):
        with pytest.raises(ValueError):
            th.create_hosts(1, bad)
    with pytest.raises(ValueError):
        th.create_hosts(245, "zfhtest-")  # 10.231.0.255 is the broadcast address
    p = th.unique_prefix()
    assert len(f"{p}244b") <= 15 and not p[-1].isdigit()


@pytest.mark.timeout(60)
def test_cli_up_list_exec_down():
    require_netns()
    prefix = th.unique_prefix()
    script = str(th.__file__)
    try:
        up = subprocess.run([PY, script, "up", "2", "--prefix", prefix],
                            capture_output=True, text=True, timeout=30)
        assert up.returncode == 0, up.stderr
        assert up.stdout.split("\n")[0].split("\t")[:2] == [f"{prefix}1", "10.231.0.11"]
        ls = subprocess.run([PY, script, "list", "--prefix", prefix], capture_output=True, text=True, timeout=30)
        assert f"{prefix}2\t10.231.0.12\tdev {prefix}2 UP" in ls.stdout
        ex = subprocess.run([PY, script, "exec", "2", "--prefix", prefix, "--", "ip", "-4", "-o", "addr"],
                            capture_output=True, text=True, timeout=30)
        assert "10.231.0.12/24" in ex.stdout and "10.231.0.11" not in ex.stdout
    finally:
        down = subprocess.run([PY, script, "down", "--prefix", prefix], capture_output=True, text=True, timeout=30)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(prefix)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hosts", [{"n": 2, "delay_ms": 50}], indirect=True)
def test_netem_delay(hosts):
    ok, reason = th.netem_available()
    if not ok:
        pytest.skip(reason)
    h1, h2 = hosts
    assert h1.delay_ms == 50
    _, port = start_echo_server(h1, h1.ip)
    script = ("import socket,sys,time; t=time.monotonic(); "
              "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close(); "
              "print(time.monotonic()-t)")
    out = subprocess.run(th.host_exec_argv(h2, [PY, "-c", script, h1.ip, str(port)]),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert float(out) >= 0.09  # a TCP handshake is one round trip: 2 x 50 ms


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hosts", [5], indirect=True)
def test_hosts_fixture_count_parameter(hosts):
    assert [h.name for h in hosts] == [f"{hosts[0].prefix}{i}" for i in range(1, 6)]
    assert hosts[4].ip == "10.231.0.15"
    # refused (not a timeout) means the SYN reached host 1 and its RST came back
    assert echo(hosts[4], hosts[0].ip, 9, timeout=2.0) == "ERR ConnectionRefusedError ECONNREFUSED"
