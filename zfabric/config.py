"""Configuration objects and the address rule (layer 2: imports only `errors`).

Every option and its default is defined once, here; the CLI reads these
defaults instead of restating them.

The address rule: a fabric is named by ONE address, the scheduler's intake.
For ``tcp://HOST:P`` the workers' port is ``P+1``; for ``ipc://PATH`` it is
``ipc://PATH.workers``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from .errors import ConfigError

_TCP = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\s]+):(?P<port>\d+)$")


@dataclass(frozen=True)
class FabricAddress:
    """The two endpoints of a scheduler, derived from the one address users give."""

    intake: str
    workers: str
    host: str | None  # None for ipc

    @classmethod
    def parse(cls, address: str) -> "FabricAddress":
        address = address.strip()
        if address.startswith("ipc://"):
            if len(address) <= len("ipc://"):
                raise ConfigError(f"ipc address {address!r} has no path; use ipc:///tmp/name")
            return cls(address, address + ".workers", None)
        m = _TCP.match(address)
        if not m:
            raise ConfigError(
                f"bad fabric address {address!r}: expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:7100) "
                "or ipc:///path")
        host, port = m.group("host"), int(m.group("port"))
        if not 0 <= port < 65535:
            raise ConfigError(f"bad port {port} in {address!r}: it must be 0..65534 (the workers use PORT+1; "
                              "0 picks a free pair when binding)")
        return cls(f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}", host.strip("[]"))

    @property
    def port(self) -> int | None:
        return int(self.intake.rsplit(":", 1)[1]) if self.host is not None else None


@dataclass(frozen=True)
class CurveConfig:
    """Turn CURVE on: `keys_dir` as made by ``zfabric keys``; `name` picks this component's keypair
    (default: scheduler, worker or client by role)."""

    keys_dir: str
    name: str = ""


def local_ip_towards(host: str) -> str:
    """The local interface address that routes to `host` (no packet is sent: UDP connect only picks a route)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        resolved = str(socket.getaddrinfo(host, 9, family, socket.SOCK_DGRAM)[0][4][0])
        if resolved.startswith("127.") or resolved == "::1":
            return resolved
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((resolved, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _cpu_threads() -> int:
    return max(2, min(32, (os.cpu_count() or 2) * 2))


@dataclass
class Timing:
    """Heartbeat and liveness settings shared by every component."""

    heartbeat_s: float = 0.5
    """Interval of application-level heartbeats in both directions."""
    worker_timeout_s: float = 2.5
    """A worker silent this long is declared dead; its tasks run elsewhere."""
    scheduler_timeout_s: float = 2.5
    """A worker or client that hears nothing from the scheduler this long reconnects."""
    client_timeout_s: float = 10.0
    """The scheduler forgets a silent client, and its queued tasks, after this long."""


@dataclass
class SchedulerConfig:
    """Options of a scheduler process."""

    bind: str = "tcp://127.0.0.1:7100"
    timing: Timing = field(default_factory=Timing)
    max_deaths: int = 3
    """A task that was on `max_deaths - 1` dying workers (beside other tasks) becomes a suspect and runs
    isolated in a child process of its next worker, where its death names it (`WorkerLost`)."""
    max_clients: int = 500
    """Clients registered at once (each costs a socket to its sink). When full, the oldest client holding
    no task makes room. A client with no task is forgotten after 3 silent heartbeats, one with tasks after
    `client_timeout_s`."""
    max_queued: int = 2_000_000
    """Tasks held (queued + running) across all clients; beyond it submissions are rejected."""
    metrics_port: int | None = None
    """Serve Prometheus metrics at http://BIND_HOST:PORT/metrics (0 picks a port); needs the observe extra."""
    curve: CurveConfig | None = None


@dataclass
class WorkerConfig:
    """Options of a worker process."""

    address: str = "tcp://127.0.0.1:7100"
    app: tuple[str, ...] = ()
    concurrency: int = 10_000
    """Tasks held at once (async tasks running on the loop plus sync tasks queued for threads)."""
    threads: int = field(default_factory=_cpu_threads)
    """Threads running sync functions."""
    timeout_procs: int = 2
    """Child processes for sync tasks with a `timeout_s` (killed and replaced when a task overruns)."""
    name: str = ""
    grace_s: float = 10.0
    """On SIGTERM, running tasks get this long to finish before they are handed back."""
    sink_idle_s: float = 30.0
    """A result socket to a sink idle this long is closed."""
    result_buffer_bytes: int = 64 * 1024 * 1024
    """Results held for one sink that does not read; beyond it they are dropped and counted (the client's
    audit finds the tasks and submits them again)."""
    timing: Timing = field(default_factory=Timing)
    curve: CurveConfig | None = None
    accept_pickle: bool = False
    """Run tasks whose arguments a client pickled (``serializer="pickle"``): only on fabrics that trust every
    client, since unpickling runs code of the sender's choosing."""
    tags: tuple[str, ...] = ()
    """Tasks submitted with ``tags=[...]`` run only on workers that have every one of them."""
    resources: dict[str, float] = field(default_factory=dict)
    """Amounts this worker has (``{"gpu": 2}``): it runs at most as many tasks at once as they allow of the
    tasks submitted with ``resources=``."""


@dataclass
class ClientConfig:
    """Options of a client."""

    address: str = "tcp://127.0.0.1:7100"
    timeout_s: float = 30.0
    """How long the client waits for an unreachable scheduler before failing its tasks."""
    window: int = 20_000
    """Tasks this client keeps in the scheduler at once; the rest wait in the client."""
    audit_s: float = 2.0
    """How often the client asks the scheduler which of its unfinished tasks it no longer holds; a task
    missing twice in a row (its result was lost after it finished) is submitted again."""
    max_backlog: int = 1_000_000
    """Tasks waiting in the client beyond which `submit_wait` waits."""
    sink_bind: str | None = None
    """Where the result sink binds (default: the interface routing to the scheduler, random port)."""
    sink_advertise: str | None = None
    """The sink address workers are told to use (for NAT); default: the bound address."""
    results_to: str = ""
    """Send results to this standalone sink (`zfabric sink`) instead: fire and forget, a handle is done once
    the scheduler accepted its task."""
    timing: Timing = field(default_factory=Timing)
    curve: CurveConfig | None = None
    serializer: str = "msgpack"
    """"msgpack" (the value table, no pickle) or "pickle" (any picklable value; workers must be started with
    --accept-pickle, and results come back pickled too)."""
    main_functions: bool = False
    """The workers loaded this process's script (`zfabric.local` sets it): its functions may be submitted."""
