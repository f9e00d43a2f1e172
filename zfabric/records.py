"""What the scheduler knows of each task, worker and client (layer 3: plain data, no logic).

The rule it keeps: these are records, not actors; only `scheduling` changes them (imports routing only).
A task is in exactly one state: QUEUED, SUSPECT (queued apart, see `queueing`),
DELAYED (a retry's back-off), RUNNING (on `worker`), or GONE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .routing import Equipment, Route

QUEUED, RUNNING, DELAYED, SUSPECT, GONE = 0, 1, 2, 3, -1


class Task:
    __slots__ = ("id", "client", "sink", "priority", "payload", "state", "worker", "tries", "deaths", "lost_alone",
                 "route", "accepted_at", "queued_at")

    def __init__(self, task_id: int, client: "ClientRecord", sink: str, priority: int, payload: bytes,
                 route: Route | None = None) -> None:
        self.id = task_id
        self.client = client
        self.sink = sink
        self.priority = priority
        self.payload = payload
        self.state = QUEUED
        self.worker: WorkerRecord | None = None
        self.tries = 0
        self.deaths = 0  # workers that died while it ran beside other tasks
        self.lost_alone = 0  # workers that died while it ran isolated in a child process (no evidence)
        self.route = route  # the tags and resources it needs of its worker; None: any worker
        self.accepted_at = 0.0  # when the scheduler took it (for the round-trip metric)
        self.queued_at = 0.0  # when it last went into the queue (for the queue-wait metric)


@dataclass(eq=False)
class WorkerRecord:
    wid: bytes
    name: str
    session: int
    free: int
    pid: int
    host: str
    last_seen: float
    capacity: int = 0  # slots it announced at registration (free + running): free + len(tasks) never exceeds it
    tasks: set[Task] = field(default_factory=set)
    orphans: set[int] = field(default_factory=set)  # ids it reported running that no client has resubmitted yet
    abandoned: set[int] = field(default_factory=set)  # ids running here whose client left: counted when done
    releasing: dict[int, Route] = field(default_factory=dict)  # cancelled here: resources held until reported
    suspect: Task | None = None
    dispatch_seq: int = 0
    done_seq: int = 0
    draining: bool = False
    done: int = 0
    equipment: Equipment = field(default_factory=Equipment)  # its tags, resources, and what its tasks hold
    overcommitted: bool = False  # it runs routed tasks it could not have been given (adopted after a restart)
    bad_input: dict[str, int] = field(default_factory=dict)  # malformed input it saw, as its heartbeat says


@dataclass(eq=False)
class ClientRecord:
    cid: bytes
    sink: str
    last_seen: float
    tasks: set[Task] = field(default_factory=set)
    accepted: list[int] = field(default_factory=list)  # acknowledged in batches by `tick`
    bad_input: dict[str, int] = field(default_factory=dict)  # malformed input it saw, as its hello says
    routes: dict[Route, int] = field(default_factory=dict)  # its held tasks that need tags or resources


@dataclass
class Counters:
    submitted: int = 0
    done: int = 0
    failed: int = 0
    rejected: int = 0
    redelivered: int = 0
    lost: int = 0
    cancelled: int = 0
    duplicates: int = 0
    retried: int = 0
