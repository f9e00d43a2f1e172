#!/usr/bin/env python3
"""Test hosts: several isolated network stacks on one Linux machine.

Each *test host* is a Linux network namespace with its own loopback, its own
interface, address and routing table. The hosts are cabled to one Linux
bridge that itself lives in a separate namespace, so nothing at all is added
to the root namespace's interfaces, addresses or routes::

        ns {prefix}1            ns {prefix}br              ns {prefix}2
     lo 127.0.0.1                                       lo 127.0.0.1
     {prefix}1  10.231.0.11 ===== {prefix}1b ┐
                                  bridge {prefix}br
     {prefix}2  10.231.0.12 ===== {prefix}2b ┘  ...

Every veth pair is created *inside* the namespaces in one netlink request
(``ip -n HOST link add ... peer name ... netns BRIDGE``), so even a crash in
the middle of set-up never leaves an interface in the root namespace. The test
subnet (10.231.0.0/24 by default, host i = .10+i) exists only inside the
hosts; there is no default route, so a host can reach the other hosts and its
own loopback and nothing else.

Library use::

    from testhosts import TestHosts, host_exec_argv
    with TestHosts(3, delay_ms=5) as hosts:          # removed on exit, always
        subprocess.run(host_exec_argv(hosts[0], ["ip", "addr"]))

Command line (root needed)::

    testhosts.py up 4 [--prefix zfh-] [--delay-ms 20]
    testhosts.py exec zfh-1 -- python3 -m zfabric scheduler --bind tcp://10.231.0.11:7100
    testhosts.py exec 2 -- ping -c1 10.231.0.11      # a bare number = {prefix}{i}
    testhosts.py list [--prefix zfh-]
    testhosts.py down [--prefix zfh-] | down --stale

Requirements: Linux, root (CAP_SYS_ADMIN + CAP_NET_ADMIN), iproute2 (``ip``),
the ``veth`` and ``bridge`` kernel modules; ``tc`` + ``sch_netem`` only for
``--delay-ms`` (without them the delay is skipped with a warning).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from collections.abc import Iterator, Sequence

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SUBNET",
    "Host",
    "TestHosts",
    "TestHostsError",
    "create_hosts",
    "destroy_hosts",
    "destroy_stale",
    "host_exec_argv",
    "link_down",
    "link_up",
    "list_hosts",
    "netem_available",
    "netns_available",
    "unique_prefix",
]

log = logging.getLogger("testhosts")

DEFAULT_PREFIX = "zfh-"
DEFAULT_SUBNET = "10.231.0.0/24"
HOST_OFFSET = 10  # host i gets network address + 10 + i
CMD_TIMEOUT = 30.0  # seconds for any single ip/tc invocation
IFNAMSIZ = 15  # longest Linux interface name
# A prefix must end in a non-digit so "{prefix}{i}" is unambiguous
# ("zt1" + "11" vs "zt11" + "1"), and be short enough that "{prefix}{i}b"
# (i up to 3 digits) is still a valid interface name.
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,9}[A-Za-z_.-]$|^[A-Za-z_.-]$")
# Prefixes made by unique_prefix(): "zt" + base36(pid) + "." + 2 random + "-"
_UNIQUE_RE = re.compile(r"^zt([0-9a-z]+)\.[0-9a-z]{2}-$")
_STALE_NS_RE = re.compile(r"^(zt[0-9a-z]+\.[0-9a-z]{2}-)(?:\d+|br)$")


class TestHostsError(RuntimeError):
    """A test-host operation failed (the message holds the command and its stderr)."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class Host:
    """One test host: a network namespace with one interface on the test subnet."""

    __test__ = False

    name: str  # namespace name, "{prefix}{index}"
    index: int  # 1..N
    ip: str  # address on the test subnet, e.g. "10.231.0.11"
    veth: str  # the host's interface (inside its namespace), "{prefix}{index}"
    peer: str  # the other end, a bridge port in "{prefix}br", "{prefix}{index}b"
    prefix: str
    bridge_ns: str  # "{prefix}br"
    prefixlen: int = 24
    delay_ms: float | None = None  # netem delay actually applied (None: none)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return host_exec_argv(self, argv)

    def __str__(self) -> str:
        return f"{self.name} ({self.ip})"


# --------------------------------------------------------------------------- helpers


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise TestHostsError(f"{argv[0]}: not found ({exc})") from None
    except subprocess.TimeoutExpired:
        raise TestHostsError(f"timed out after {timeout:g}s: {' '.join(argv)}") from None
    if check and cp.returncode != 0:
        raise TestHostsError(
            f"command failed (exit {cp.returncode}): {' '.join(argv)}: "
            f"{(cp.stderr or cp.stdout).strip()}"
        )
    return cp


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"bad test-host prefix {prefix!r}: 1-11 characters from [A-Za-z0-9_.-], "
            "not ending in a digit (interface names are limited to 15 characters)"
        )


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def unique_prefix() -> str:
    """A prefix no concurrent run can share: ``zt{base36(pid)}.{2 random}-``.

    The pid is recoverable, which lets :func:`destroy_stale` remove hosts left
    by a run that was SIGKILLed before it could clean up.
    """
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    rand = "".join(secrets.choice(alphabet) for _ in range(2))
    return f"zt{_b36(os.getpid())}.{rand}-"


def _netns_names() -> list[str]:
    cp = _ip("netns", "list", check=False)
    if cp.returncode != 0:
        return []
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _ns_re(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}(?:\d+|br)$")


def _link_re(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}(?:\d+b?|br)$")


def _root_links() -> list[str]:
    cp = _ip("-o", "link", "show", check=False)
    names = []
    for line in cp.stdout.splitlines():
        # "7: name@peer: <FLAGS> ..."
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def host_exec_argv(host: Host | str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside ``host``'s namespace (``ip netns exec NAME ...``).

    ``ip netns exec`` execs the command directly, so the pid you get from
    ``Popen`` is the command's own pid, and signals reach it.
    """
    name = host.name if isinstance(host, Host) else str(host)
    return ["ip", "netns", "exec", name, *argv]


# --------------------------------------------------------------------------- probes


@functools.lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """Can test hosts be made here? Returns ``(ok, reason)``; the reason says why not.

    Checks Linux, root, the ``ip`` binary, and really makes (and removes) a
    trial namespace holding a bridge and a veth pair. Cached per process.
    """
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "network namespaces need root (CAP_SYS_ADMIN/CAP_NET_ADMIN); run as root"
    if shutil.which("ip") is None:
        return False, "the 'ip' binary (iproute2) is not installed"
    probe = f"ztprobe{_b36(os.getpid())}{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
    except TestHostsError as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "ztprobebr", "type", "bridge")
        _ip("-n", probe, "link", "add", "ztprobe0", "type", "veth", "peer", "name", "ztprobe1")
        _ip("-n", probe, "link", "set", "lo", "up")
    except TestHostsError as exc:
        return False, f"cannot create bridge/veth links in a namespace: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return True, "ok"


@functools.lru_cache(maxsize=1)
def netem_available() -> tuple[bool, str]:
    """Can ``tc ... netem delay`` be used? ``(ok, reason)``, cached per process."""
    ok, reason = netns_available()
    if not ok:
        return False, reason
    if shutil.which("tc") is None:
        return False, "the 'tc' binary (iproute2) is not installed"
    probe = f"ztprobe{_b36(os.getpid())}{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "ztprobe0", "type", "veth", "peer", "name", "ztprobe1")
        _run(["tc", "-n", probe, "qdisc", "add", "dev", "ztprobe0", "root", "netem", "delay", "1ms"])
    except TestHostsError as exc:
        return False, f"tc netem unavailable (kernel module sch_netem missing?): {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return True, "ok"


# --------------------------------------------------------------------------- create / destroy


def _host_ip(subnet: ipaddress.IPv4Network, i: int) -> ipaddress.IPv4Address:
    addr = subnet.network_address + HOST_OFFSET + i
    if addr not in subnet or addr == subnet.broadcast_address:
        raise ValueError(f"host {i} does not fit in {subnet} (host i = .{HOST_OFFSET}+i)")
    return addr


def create_hosts(
    n: int,
    prefix: str = DEFAULT_PREFIX,
    delay_ms: float | None = None,
    *,
    subnet: str = DEFAULT_SUBNET,
) -> list[Host]:
    """Create ``n`` test hosts ``{prefix}1..{prefix}n`` on one bridge; return them.

    ``delay_ms`` adds ``tc netem delay`` on every host's egress, so any
    host-to-host packet is delayed ``delay_ms`` one way (RTT = 2 x delay_ms).
    If netem is unavailable that is logged as a warning and the hosts are
    made without delay (``Host.delay_ms`` is then None).

    If anything fails (or is interrupted) everything made so far is removed
    before the exception propagates. Raises :class:`TestHostsError` if hosts
    with this prefix already exist.
    """
    _check_prefix(prefix)
    if n < 1:
        raise ValueError("need at least one host")
    net = ipaddress.IPv4Network(subnet)
    _host_ip(net, n)  # validates the range before touching anything
    pattern = _ns_re(prefix)
    existing = [name for name in _netns_names() if pattern.match(name)]
    if existing:
        raise TestHostsError(
            f"test hosts with prefix {prefix!r} already exist ({', '.join(existing)}); "
            f"remove them first: testhosts.py down --prefix {prefix}"
        )
    use_delay = delay_ms is not None and delay_ms > 0
    if use_delay:
        ok, reason = netem_available()
        if not ok:
            log.warning("link delay not applied: %s", reason)
            use_delay = False

    br_ns = f"{prefix}br"
    bridge = f"{prefix}br"
    hosts: list[Host] = []
    try:
        _ip("netns", "add", br_ns)
        _ip("-n", br_ns, "link", "set", "lo", "up")
        # STP is off by default, so ports forward as soon as they are up.
        _ip("-n", br_ns, "link", "add", bridge, "type", "bridge")
        _ip("-n", br_ns, "link", "set", bridge, "up")
        for i in range(1, n + 1):
            name = f"{prefix}{i}"
            veth, peer = f"{prefix}{i}", f"{prefix}{i}b"
            addr = _host_ip(net, i)
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
            # One netlink request makes the pair with each end already in its
            # namespace: nothing ever appears in the root namespace.
            _ip("-n", name, "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", br_ns)
            _ip("-n", br_ns, "link", "set", peer, "master", bridge)
            _ip("-n", br_ns, "link", "set", peer, "up")
            _ip("-n", name, "addr", "add", f"{addr}/{net.prefixlen}", "dev", veth)
            _ip("-n", name, "link", "set", veth, "up")
            applied = None
            if use_delay:
                # A generous queue limit: netem's default of 1000 packets
                # drops traffic at high rates once the delay holds more.
                _run(["tc", "-n", name, "qdisc", "replace", "dev", veth, "root",
                      "netem", "delay", f"{delay_ms}ms", "limit", "100000"])
                applied = float(delay_ms)
            hosts.append(Host(name=name, index=i, ip=str(addr), veth=veth, peer=peer,
                              prefix=prefix, bridge_ns=br_ns, prefixlen=net.prefixlen,
                              delay_ms=applied))
    except BaseException:
        destroy_hosts(prefix)
        raise
    return hosts


def _kill_ns_pids(ns: str) -> None:
    cp = _ip("netns", "pids", ns, check=False)
    me = os.getpid()
    for tok in cp.stdout.split():
        try:
            pid = int(tok)
        except ValueError:
            continue
        if pid == me:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def destroy_hosts(prefix: str = DEFAULT_PREFIX, *, kill: bool = True) -> list[str]:
    """Remove every namespace and link named with ``prefix``; idempotent.

    Works after a partial :func:`create_hosts` too. With ``kill`` (default),
    processes still running inside those namespaces are SIGKILLed first:
    otherwise ``ip netns del`` only drops the name, and the namespace (with
    its interface) lives on unseen for as long as a process sits in it.
    Returns the names removed.
    """
    _check_prefix(prefix)
    ns_pat, link_pat = _ns_re(prefix), _link_re(prefix)
    names = [name for name in _netns_names() if ns_pat.match(name)]
    # Hosts first, the bridge last (deleting either end of a veth removes both).
    names.sort(key=lambda s: (s.endswith("br"), s))
    removed: list[str] = []
    errors: list[str] = []
    for name in names:
        if kill:
            _kill_ns_pids(name)
        cp = _ip("netns", "del", name, check=False)
        if cp.returncode == 0:
            removed.append(name)
        elif name in _netns_names():
            errors.append(f"{name}: {cp.stderr.strip()}")
    # Links are only ever made inside the namespaces, but if something ever
    # left one in the root namespace, take it too.
    for link in _root_links():
        if link_pat.match(link):
            cp = _ip("link", "del", link, check=False)
            if cp.returncode == 0:
                removed.append(link)
            elif link in _root_links():
                errors.append(f"link {link}: {cp.stderr.strip()}")
    if errors:
        raise TestHostsError("could not remove: " + "; ".join(errors))
    return removed


def destroy_stale() -> list[str]:
    """Remove hosts made under a :func:`unique_prefix` whose process is gone.

    Cleans up after runs that were SIGKILLed before they could clean up.
    Returns the prefixes removed.
    """
    prefixes = set()
    for name in _netns_names():
        m = _STALE_NS_RE.match(name)
        if m:
            prefixes.add(m.group(1))
    removed = []
    for prefix in sorted(prefixes):
        pid = int(_UNIQUE_RE.match(prefix).group(1), 36)
        try:
            os.kill(pid, 0)
            continue  # its owner is still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        destroy_hosts(prefix)
        removed.append(prefix)
    return removed


# --------------------------------------------------------------------------- links


def link_down(host: Host) -> None:
    """Cut the host's cable: its interface goes down (it keeps its address).

    The host loses its route to the subnet at once; its peers' packets to it
    are dropped silently (then fail with EHOSTUNREACH once ARP gives up).
    Processes in the host and their open sockets survive.
    """
    _ip("-n", host.name, "link", "set", host.veth, "down")


def link_up(host: Host) -> None:
    """Restore the host's cable; the kernel re-adds the subnet route."""
    _ip("-n", host.name, "link", "set", host.veth, "up")


def list_hosts(prefix: str = DEFAULT_PREFIX) -> list[dict]:
    """Describe existing test hosts with ``prefix``: name, ip, veth, state."""
    _check_prefix(prefix)
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    out = []
    for name in sorted(_netns_names(), key=lambda s: (len(s), s)):
        m = pattern.match(name)
        if not m:
            continue
        veth = name
        cp = _ip("-n", name, "-o", "-4", "addr", "show", "dev", veth, check=False)
        ips = re.findall(r"inet (\S+)", cp.stdout)
        st = _ip("-n", name, "-o", "link", "show", "dev", veth, check=False)
        state = re.search(r"state (\S+)", st.stdout)
        qd = _run(["tc", "-n", name, "qdisc", "show", "dev", veth], check=False) if shutil.which("tc") else None
        delay = re.search(r"delay (\S+)", qd.stdout) if qd else None
        out.append({
            "name": name,
            "index": int(m.group(1)),
            "ip": ips[0].split("/")[0] if ips else None,
            "veth": veth,
            "state": state.group(1) if state else "?",
            "delay": delay.group(1) if delay else None,
        })
    return out


# --------------------------------------------------------------------------- context manager


class TestHosts(Sequence[Host]):
    """``with TestHosts(n, prefix=None, delay_ms=None) as hosts:`` — hosts[0] is host 1.

    With no prefix a :func:`unique_prefix` is used, so concurrent runs never
    collide. The hosts are destroyed on exit, whatever happened inside.
    """

    __test__ = False  # keep pytest from collecting this class

    def __init__(self, n: int = 3, prefix: str | None = None, delay_ms: float | None = None,
                 *, subnet: str = DEFAULT_SUBNET) -> None:
        self.n = n
        self.prefix = prefix or unique_prefix()
        _check_prefix(self.prefix)
        self.delay_ms = delay_ms
        self.subnet = subnet
        self.hosts: list[Host] = []

    def __enter__(self) -> "TestHosts":
        self.hosts = create_hosts(self.n, self.prefix, self.delay_ms, subnet=self.subnet)
        return self

    def __exit__(self, *exc) -> None:
        self.hosts = []
        destroy_hosts(self.prefix)

    def __getitem__(self, i):  # type: ignore[override]
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)


# --------------------------------------------------------------------------- CLI


def _resolve_host(spec: str, prefix: str) -> str:
    return f"{prefix}{spec}" if spec.isdigit() else spec


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="testhosts.py",
        description="Create/remove test hosts: network namespaces on a private bridge (root needed).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="create N test hosts")
    p_up.add_argument("n", type=int)
    p_up.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"name prefix (default {DEFAULT_PREFIX})")
    p_up.add_argument("--delay-ms", type=float, default=None, help="netem delay on every host link (one way)")
    p_up.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"test subnet (default {DEFAULT_SUBNET})")
    p_down = sub.add_parser("down", help="remove the test hosts with a prefix (idempotent)")
    p_down.add_argument("--prefix", default=DEFAULT_PREFIX)
    p_down.add_argument("--stale", action="store_true",
                        help="instead remove hosts left by dead test runs (unique zt… prefixes)")
    p_exec = sub.add_parser("exec", help="run a command inside a host: exec HOST -- cmd ...")
    p_exec.add_argument("host", help="namespace name, or a number i meaning {prefix}i")
    p_exec.add_argument("--prefix", default=DEFAULT_PREFIX)
    p_exec.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- cmd ...")
    p_list = sub.add_parser("list", help="show the test hosts with a prefix")
    p_list.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="testhosts: %(message)s", stream=sys.stderr)

    try:
        if args.action == "up":
            ok, reason = netns_available()
            if not ok:
                print(f"testhosts: cannot create test hosts: {reason}", file=sys.stderr)
                return 2
            hosts = create_hosts(args.n, args.prefix, args.delay_ms, subnet=args.subnet)
            for h in hosts:
                delay = f"  delay {h.delay_ms:g}ms" if h.delay_ms else ""
                print(f"{h.name}\t{h.ip}\tdev {h.veth}{delay}")
            print(f"# bridge namespace {hosts[0].bridge_ns}; remove with: "
                  f"{sys.argv[0]} down --prefix {args.prefix}", file=sys.stderr)
        elif args.action == "down":
            if args.stale:
                for p in destroy_stale():
                    print(f"removed stale {p}*")
            else:
                removed = destroy_hosts(args.prefix)
                print(f"removed {len(removed)} namespace(s)/link(s) with prefix {args.prefix!r}")
        elif args.action == "exec":
            cmd = list(args.argv)
            if "--" in cmd:  # options given after HOST land in the remainder: "exec 2 --prefix p -- cmd"
                i = cmd.index("--")
                late = argparse.ArgumentParser(prog="testhosts.py exec", add_help=False)
                late.add_argument("--prefix", default=args.prefix)
                args.prefix = late.parse_args(cmd[:i]).prefix
                cmd = cmd[i + 1:]
            if not cmd:
                parser.error("exec needs a command: exec HOST -- cmd ...")
            argv2 = host_exec_argv(_resolve_host(args.host, args.prefix), cmd)
            os.execvp(argv2[0], argv2)
        elif args.action == "list":
            for h in list_hosts(args.prefix):
                delay = f"  delay {h['delay']}" if h["delay"] else ""
                print(f"{h['name']}\t{h['ip']}\tdev {h['veth']} {h['state']}{delay}")
    except (TestHostsError, ValueError) as exc:
        print(f"testhosts: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
