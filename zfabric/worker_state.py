"""The worker's link to its scheduler as a pure state machine (layer 3: imports protocol).

The rule it keeps: a slot is credit, and credit is conserved. The worker
announces its free slots at HELLO; every task entry a DISPATCH brings takes
one, and every entry gives it back exactly once in a later DONE (finished,
handed back for a retry, a duplicate or a malformed entry), or goes back at
DRAIN. `validate()` checks that, at every step::

    seen_free + len(running) + credit + withheld == concurrency

where ``seen_free`` is the free slots as the scheduler counts them, and
``credit`` what the next DONE gives back. Sessions and sequence numbers are
kept here too: a DISPATCH of an older session is ignored (the scheduler
requeued it), a gap in DISPATCH numbers means a lost message and a new
HELLO. Each start of a task gets a run number; an outcome is counted only
for the run still current, so a late outcome of a cancelled, handed-back or
re-run task changes nothing.

No sockets, no clock, no event loop: events go in as method calls with
``now``; what must be sent or done comes out as typed commands in
`commands`, which `Worker` (the asyncio driver) carries out. Running the
tasks themselves (and their results, which go straight to client sinks) is
the driver's; whether a task counts as finished is decided here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .protocol import MAX_BATCH_TASKS, Buffer, payload_of

MAX_ERRORS = 100
"""Failures whose type and message one DONE carries (the rest are named with empty ones)."""

log = logging.getLogger("zfabric.worker")


# ---- commands: what the driver carries out ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendHello:
    """A WORKER_HELLO: register (again) with ``free`` slots, these tasks still running here."""
    session: int
    free: int
    running: list[int]


@dataclass(frozen=True, slots=True)
class SendDone:
    """A DONE: results of ``finished`` must leave for their sinks before it (they are the durable copy)."""
    session: int
    seq: int
    credit: int
    finished: list[int]
    n_failed: int
    retries: list[Any]  # flat [id, delay_s, ...]
    errors: list[Any] = field(default_factory=list)  # flat [id, type, message, ...] of failures


@dataclass(frozen=True, slots=True)
class SendDrain:
    """A DRAIN: take no more work from this worker; these ids were handed back and must run elsewhere."""
    session: int
    handed_back: list[int]


@dataclass(frozen=True, slots=True)
class SendBye:
    """A WORKER_BYE: this worker leaves now."""
    session: int


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Stop this run of a task if it can be stopped (a cancel); the driver reports back with `finish`."""
    task_id: int
    run: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """A DISPATCH entry or group that was not well formed (to count and log as bad input)."""
    what: str


Command = SendHello | SendDone | SendDrain | SendBye | Interrupt | Malformed


Start = tuple[int, int, str, int, Buffer, bool]
"""Run this task: (task id, run number, sink, tries, payload, isolate), one per new task a DISPATCH brings.
A plain tuple: it is made per task, and a NamedTuple costs a Python-level call each."""
Running = tuple[int, str]
"""(run number, sink) of a task running here."""


class WorkerState:
    """Sessions, sequence numbers, running table, credit, retries and drain of one worker."""

    def __init__(self, concurrency: int, heartbeat_s: float, scheduler_timeout_s: float, name: str = "") -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.name = name
        self.concurrency = concurrency
        self.heartbeat_s = heartbeat_s
        self.scheduler_timeout_s = scheduler_timeout_s
        self.session = 0
        self.epoch: int | None = None
        self.dispatch_seq = 0
        self.done_seq = 0
        self.registered = False
        self.draining = False
        self.last_hello = float("-inf")
        self.last_heard = float("-inf")
        self.running: dict[int, Running] = {}
        self.next_run = 1
        self.finished: list[int] = []
        self.errors: list[Any] = []  # why some of `finished` failed (at most MAX_ERRORS a DONE)
        self.retries: list[Any] = []
        self.credit = 0
        self.n_failed = 0
        self.seen_free = 0
        self.withheld = concurrency  # slots not offered: all, until the first HELLO
        self.commands: list[Command] = []
        self.counts = {"done": 0, "failed": 0, "retried": 0, "duplicates": 0, "stale_dispatches": 0}

    def take(self) -> list[Command]:
        """The commands to carry out, in order (and forget them here)."""
        commands, self.commands = self.commands, []
        return commands

    # ---- the scheduler link ---------------------------------------------------------------

    def hello(self, now: float) -> None:
        """Register (again): a new session; what finished under the old one is reported first."""
        if self.finished or self.retries:
            self._done()  # need not run again: the scheduler still knows these under the old session
        self.session += 1
        self.dispatch_seq = 0
        self.done_seq = 0
        self.registered = False
        self.last_hello = now
        self.finished, self.retries, self.credit, self.n_failed, self.errors = [], [], 0, 0, []
        free = 0 if self.draining else max(0, self.concurrency - len(self.running))
        self.seen_free = free
        self.withheld = self.concurrency - free - len(self.running)
        self.commands.append(SendHello(self.session, free, list(self.running)))

    def heard(self, now: float) -> None:
        """Any message from the scheduler arrived."""
        self.last_heard = now

    def on_register(self, epoch: int, now: float) -> None:
        """The scheduler does not know us. Say hello, unless we just did (its REGISTER crossed our HELLO)."""
        if now - self.last_hello > self.heartbeat_s:
            log.info("worker %s: the scheduler (epoch %x) asks us to register", self.name, epoch)
            self.hello(now)

    def on_heartbeat(self, epoch: int, session: int, dispatch_seq: int, now: float) -> None:
        if session != self.session:
            return  # meant for an older session of ours
        if self.epoch != epoch and self.epoch is not None:
            log.info("worker %s: new scheduler epoch %x", self.name, epoch)
        self.epoch = epoch
        if dispatch_seq != self.dispatch_seq:
            log.warning("worker %s: scheduler sent DISPATCH %d, we saw %d; re-registering",
                        self.name, dispatch_seq, self.dispatch_seq)
            self.hello(now)  # a DISPATCH was lost on the way: start a new session, it requeues the rest
            return
        self.registered = True

    def on_dispatch(self, epoch: int, session: int, seq: int, groups: list[Any], now: float,
                    frames: tuple[Any, ...] = ()) -> list[Start]:
        """Tasks to run; each entry of ``groups`` is ``[sink, [id, tries, payload, ...]]`` (``, 1]`` = isolate),
        a large payload named by its number among the message's payload ``frames``."""
        if session != self.session:
            self.counts["stale_dispatches"] += 1
            return []  # sent before our latest HELLO; the scheduler requeued those tasks
        if self.draining:  # crossed our DRAIN on the wire: hand it straight back
            self.dispatch_seq = seq
            back: list[int] = []
            for group in groups:
                if type(group) is list and len(group) in (2, 3) and type(group[1]) is list:
                    flat = group[1]
                    # an id that runs here already stays ours (its DONE will report it): handed back, it would
                    # run twice
                    back += [i for i in flat[0:len(flat) - len(flat) % 3:3]
                             if type(i) is int and i not in self.running]
            self.commands.append(SendDrain(self.session, back))
            return []
        if seq != self.dispatch_seq + 1:
            log.warning("worker %s: DISPATCH %d after %d; re-registering", self.name, seq, self.dispatch_seq)
            self.hello(now)
            return []
        self.dispatch_seq = seq
        self.epoch = epoch
        self.registered = True
        starts: list[Start] = []
        running = self.running
        used: set[int] = set()  # each payload frame names one task
        for group in groups:
            if (type(group) is not list or len(group) not in (2, 3) or type(group[0]) is not str
                    or type(group[1]) is not list):
                self.commands.append(Malformed("dispatch group is not [sink, tasks]"))
                continue
            sink, flat = group[0], group[1]
            isolate = len(group) == 3 and group[2] == 1
            n = len(flat) // 3
            self.seen_free -= n
            if len(flat) % 3:
                self.commands.append(Malformed("dispatch group ends in a partial task entry"))
            for i in range(0, 3 * n, 3):
                task_id, tries, payload = flat[i], flat[i + 1], flat[i + 2]
                if type(payload) is not bytes:
                    payload = payload_of(payload, frames, used)
                if type(task_id) is not int or type(tries) is not int or payload is None:
                    self.credit += 1
                    self.commands.append(Malformed("task entry is not [id, tries, payload]"))
                    continue
                if task_id in running:
                    self.credit += 1  # already running here (a redelivery): one copy is enough
                    self.counts["duplicates"] += 1
                    continue
                run = self.next_run
                self.next_run = run + 1
                running[task_id] = (run, sink)
                starts.append((task_id, run, sink, tries, payload, isolate))
        return starts

    def on_cancel(self, ids: list[Any]) -> None:
        """The scheduler cancels these tasks: interrupt those running here (others are not ours: ignored)."""
        for task_id in ids:
            entry = self.running.get(task_id) if type(task_id) is int else None
            if entry is not None:
                self.commands.append(Interrupt(task_id, entry[0]))

    def tick(self, now: float) -> None:
        """Time passes: a scheduler silent past its timeout gets a new HELLO."""
        if (now - self.last_heard > self.scheduler_timeout_s
                and now - self.last_hello > self.scheduler_timeout_s):
            log.warning("worker %s: scheduler silent for %.1f s; saying hello again", self.name, now - self.last_heard)
            self.hello(now)

    # ---- outcomes from the driver ---------------------------------------------------------

    def is_current(self, task_id: int, run: int) -> bool:
        """Whether ``run`` is the live run of ``task_id`` (an outcome of any other changes nothing)."""
        entry = self.running.get(task_id)
        return entry is not None and entry[0] == run

    def sink_of(self, task_id: int) -> str | None:
        entry = self.running.get(task_id)
        return None if entry is None else entry[1]

    def finish(self, task_id: int, run: int, failed: bool, error: tuple[str, str] | None = None) -> bool:
        """A run ended with a result (the driver sends it to its sink if this says True); its slot goes back
        in the next DONE, and a failure's ``(type, message)`` with it (for the fabric's status and events)."""
        entry = self.running.get(task_id)
        if entry is None or entry[0] != run:
            return False
        del self.running[task_id]
        self.finished.append(task_id)
        self.credit += 1
        if failed:
            self.n_failed += 1
            self.counts["failed"] += 1
            # every failure is named (so none passes for done), the first MAX_ERRORS with their error
            if error is not None and len(self.errors) < 3 * MAX_ERRORS:
                self.errors += (task_id, error[0][:100], error[1][:300])
            else:
                self.errors += (task_id, "", "")
        else:
            self.counts["done"] += 1
        return True

    def result_lost(self) -> None:
        """The result of a task just finished as a success could not be sent (an unusable sink): it failed."""
        self.n_failed += 1
        self.counts["done"] -= 1
        self.counts["failed"] += 1

    def retry(self, task_id: int, run: int, delay_s: float) -> bool:
        """A run failed with an error its task retries on: the scheduler runs it again after ``delay_s``."""
        if not self.is_current(task_id, run):
            return False
        del self.running[task_id]
        self.retries += (task_id, delay_s)
        self.credit += 1
        self.counts["retried"] += 1
        return True

    def done_due(self) -> bool:
        """Whether the scheduler needs a DONE now; else it can wait a moment and carry more.

        It can wait while it still sees over half our slots free, nothing is to be retried, we are not
        draining and the DONE is not already full."""
        return bool(self.retries or self.draining or len(self.finished) >= MAX_BATCH_TASKS
                    or self.seen_free <= self.concurrency // 2)

    def send_done(self) -> None:
        """Report what finished, and give its credit back (nothing is sent when there is nothing to say)."""
        if self.finished or self.retries or self.credit:
            self._done()

    def _done(self) -> None:
        self.done_seq += 1
        self.commands.append(SendDone(self.session, self.done_seq, self.credit, self.finished, self.n_failed,
                                      self.retries, self.errors))
        self.seen_free += self.credit
        self.finished, self.retries, self.credit, self.n_failed, self.errors = [], [], 0, 0, []

    # ---- leaving --------------------------------------------------------------------------

    def drain(self, handed_back: list[int]) -> None:
        """Take no more work; ``handed_back`` (tasks the driver took back before they started) run elsewhere."""
        self.draining = True
        self._hand_back(handed_back)

    def give_up(self) -> list[int]:
        """The grace period is over: hand back every task still running, say goodbye."""
        left = list(self.running)
        if left:
            self._hand_back(left)
        self.send_done()
        self.commands.append(SendBye(self.session))
        return left

    def _hand_back(self, ids: list[int]) -> None:
        back = [task_id for task_id in ids if self.running.pop(task_id, None) is not None]
        self.withheld += len(back)
        self.commands.append(SendDrain(self.session, back))

    # ---- invariants -----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise AssertionError if an invariant does not hold."""
        assert self.seen_free + len(self.running) + self.credit + self.withheld == self.concurrency, \
            (self.seen_free, len(self.running), self.credit, self.withheld)
        assert self.credit >= len(self.finished) + len(self.retries) // 2
        assert 0 <= self.n_failed <= len(self.finished)
        assert len(self.retries) % 2 == 0
        runs = [entry[0] for entry in self.running.values()]
        assert len(set(runs)) == len(runs) and all(0 < r < self.next_run for r in runs)
        assert self.dispatch_seq >= 0 and self.done_seq >= 0
