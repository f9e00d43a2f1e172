"""The scheduler's bookkeeping as a pure state machine (layer 3: imports protocol, config, queueing, records).

The rule it keeps: no I/O and no clock. Every method takes the event and
``now`` and appends what must be sent to `outbox`; the asyncio driver
(`zfabric.scheduler`) only receives, calls these methods and sends.

Bookkeeping: every task the scheduler holds is in `tasks` (by id) and is
either waiting in `queue` (QUEUED, SUSPECT or DELAYED, see `queueing`) or
RUNNING on exactly one worker (`records`). Workers grant credit: the
scheduler never sends a worker more tasks than the free slots it announced.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from typing import Any

from . import events as ev
from .histogram import Histogram
from .config import SchedulerConfig
from .protocol import (MAX_BATCH_BYTES, MAX_BATCH_TASKS, MAX_PAYLOAD_FRAMES, PAYLOAD_FRAME_BYTES, Accepted, Cancel, Dispatch, Heartbeat, Wire,
                       Missing, Register, Rejected, Result, Status, Welcome, attach, encode, encode_error,
                       payload_of)
from .queueing import RoutedQueue, TaskQueue
from .records import DELAYED, GONE, QUEUED, RUNNING, SUSPECT, ClientRecord, Counters, Task, WorkerRecord
from .routing import Equipment, Route, check_resources, check_tags, parse_placement

log = logging.getLogger(__name__)

MAX_ORPHANS_PER_WORKER = 100_000
MAX_ORPHANS = 200_000
"""Ids reported running by workers and not yet resubmitted, in all: a flood of fake HELLOs cannot grow past it."""
MAX_SLOTS_PER_WORKER = 1_000_000
MAX_LOST_ALONE = 5
"""A suspect fails with WorkerLost once this many workers died while it ran isolated in their child process."""
MIN_SHARE = 64
"""Fewest tasks a dispatch hands one worker while more are queued: spread thinner over many workers, the
messages per task (DISPATCH and DONE) grow with the number of workers."""
DISPATCHES_PER_S = 100
"""While tasks finish fast, a dispatch hands one worker at least ``finish_rate / DISPATCHES_PER_S`` tasks
(`MIN_SHARE` to `MAX_SHARE`), so a fast stream's DISPATCH and DONE messages per task (each wakes a process
at both ends) stop growing with the number of workers. Slow tasks finish at a low rate: they keep the
floor at `MIN_SHARE` and spread as widely as before."""
MAX_SHARE = MAX_BATCH_TASKS // 2
RECENT_FAILURES = 20
"""Failures kept for `status` (with their errors, as the workers reported them)."""
MAX_ERRORS_PER_DONE = MAX_BATCH_TASKS
MAX_SINK_CHARS = 512
MAX_NAME_CHARS = 128
"""A worker's name and host are cut to this (they go into every status and event about it)."""
MAX_ROUTES = 256
"""Most different routes (tag and resource sets) held at once: each one costs every dispatch a look."""
MAX_ROUTES_PER_CLIENT = 16
"""...and per client, so that one client cannot take them all."""
"""The floor's ceiling: half a DISPATCH, so even the fastest stream goes to two workers at a time or more."""

Outgoing = tuple[str, Any, Wire]
"""("worker", routing_id, frame) or ("client", sink_address, frame) or ("close", sink_address, b"")."""


def counts_or_empty(counts: Any) -> dict[str, int]:
    """A peer's bad-input counts as it reported them, if they are that (``{str: int}``, at most 32); else {}."""
    if type(counts) is not dict or len(counts) > 32:
        return {}
    if all(type(k) is str and len(k) <= 64 and type(v) is int and v >= 0 for k, v in counts.items()):
        return counts
    return {}


class SchedulerState:
    """Events and ``now`` in, frames to send out (in `outbox`)."""

    def __init__(self, config: SchedulerConfig, epoch: int) -> None:
        self.config = config
        self.epoch = epoch
        self.tasks: dict[int, Task] = {}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.clients: dict[bytes, ClientRecord] = {}
        self.counters = Counters()
        self.outbox: list[Outgoing] = []
        self.queue = TaskQueue(self.tasks)  # tasks any worker may take
        self.routes: dict[Route, RoutedQueue] = {}  # tasks that need tags or resources, by what they need
        self._gained: dict[WorkerRecord, None] = {}  # workers that gained slots or resources since the last dispatch
        self._orphans: dict[int, WorkerRecord] = {}  # running on a worker, not (yet) resubmitted to us
        # Workers with free slots, most free first: a lazy max-heap of (-free, tiebreak, worker); an entry
        # is stale unless its worker is live, not draining and still has exactly that many free slots.
        self._ready: list[tuple[int, int, WorkerRecord]] = []
        self._tiebreak = itertools.count()
        self.free_total = 0  # free slots of live, non-draining workers
        self._last_heartbeat = float("-inf")
        self.finish_rate = 0.0  # tasks finished per second, smoothed over ticks (see DISPATCHES_PER_S)
        self._rate_mark: tuple[float, int] | None = None  # (now, tasks finished) at the last tick
        self.refused_clients = 0  # evicted to make room, or refused for lack of it
        self.events: list[ev.Record] | None = None
        """What changed, while someone follows the event stream (the driver sets a list and takes it)."""
        self.recent_failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self._now = 0.0  # of the last event that brought its time
        self.queue_wait: Histogram | None = None
        """Seconds from SUBMIT to DISPATCH, and `round_trip` to DONE, when metrics are on (else None)."""
        self.round_trip: Histogram | None = None

    # ---- indexes --------------------------------------------------------------------------

    @property
    def n_queued(self) -> int:
        return len(self.queue) + sum(len(routed.queue) for routed in self.routes.values())

    def _queue_of(self, task: Task) -> TaskQueue:
        return self.queue if task.route is None else self.routes[task.route].queue

    def _forget(self, task: Task) -> None:
        """Remove a task from every index (a queued one is skipped lazily when popped)."""
        if self.tasks.get(task.id) is task:
            self._queue_of(task).discard(task)
            del self.tasks[task.id]
            self._release_route(task)
        task.state = GONE
        task.client.tasks.discard(task)
        self._detach(task)

    def _release_route(self, task: Task) -> None:
        """A held task is gone: one fewer for its route and its client."""
        if task.route is not None:
            client = task.client.routes
            client[task.route] -= 1
            if client[task.route] <= 0:
                del client[task.route]
            self.routes[task.route].held -= 1  # an empty route's record stays, for its next tasks

    @staticmethod
    def _detach(task: Task, still_running: bool = False) -> None:
        """Take a task off its worker. One `still_running` there (cancelled: it stops when the worker gets
        to it) keeps its resources until the worker reports it, as its slot is only given back then."""
        worker = task.worker
        if worker is not None:
            worker.tasks.discard(task)
            if worker.suspect is task:
                worker.suspect = None
            if task.route is not None:
                if still_running and len(worker.releasing) < worker.capacity:
                    worker.releasing[task.id] = task.route
                else:
                    worker.equipment.hold(task.route, -1)
            task.worker = None

    def _set_free(self, worker: WorkerRecord, free: int) -> None:
        """Change a live worker's free slots, keeping `free_total` and the ready heap right."""
        free = max(0, min(free, worker.capacity - len(worker.tasks)))
        if not worker.draining:
            self.free_total += free - worker.free
        worker.free = free
        self._offer(worker)

    def _offer(self, worker: WorkerRecord) -> None:
        if worker.free > 0 and not worker.draining:
            if len(self._ready) > 4 * len(self.workers) + 64:
                self._ready = [(-w.free, next(self._tiebreak), w) for w in self.workers.values()
                               if w.free > 0 and not w.draining]
                heapq.heapify(self._ready)
            heapq.heappush(self._ready, (-worker.free, next(self._tiebreak), worker))

    def _remove_worker(self, worker: WorkerRecord) -> None:
        """Take a worker out of every index (its tasks are the caller's to move)."""
        if self.workers.get(worker.wid) is worker:
            del self.workers[worker.wid]
            for routed in self.routes.values():
                routed.eligible_set.discard(worker)
        if not worker.draining:
            self.free_total -= worker.free
        worker.free = 0
        for task_id in worker.orphans:
            if self._orphans.get(task_id) is worker:
                del self._orphans[task_id]
        worker.orphans.clear()
        worker.abandoned.clear()

    # ---- clients --------------------------------------------------------------------------

    def _client(self, cid: bytes, sink: str, now: float) -> ClientRecord | None:
        """The client's record (registering it, with a WELCOME); None when the scheduler has no room."""
        client = self.clients.get(cid)
        if client is None:
            if len(sink) > MAX_SINK_CHARS:  # it would be repeated in every status and event of the client
                self.refused_clients += 1
                return None
            if len(self.clients) >= self.config.max_clients and not self._evict_idle_client():
                self.refused_clients += 1
                return None
            client = self.clients[cid] = ClientRecord(cid, sink, now)
            log.info("client %s registered (sink %s)", cid.hex(), sink)
            self.outbox.append(("client", sink, encode(Welcome(self.epoch, self.config.timing.heartbeat_s))))
        client.last_seen = now
        return client

    def _acknowledge(self, client: ClientRecord) -> None:
        """ACCEPTED goes out in batches (each tick), off the path of a lone task's latency."""
        if client.accepted:
            self.outbox.append(("client", client.sink, encode(Accepted(self.epoch, client.accepted))))
            client.accepted = []

    def _evict_idle_client(self) -> bool:
        """Make room by forgetting the longest-registered client that holds no task (a live one is
        WELCOMEd back at its next hello; a flood of made-up client ids cannot lock real clients out)."""
        for client in self.clients.values():  # in registration order
            if not client.tasks:
                self.refused_clients += 1
                self._drop_client(client, "evicted to make room")
                return True
        return False

    def client_hello(self, cid: bytes, sink: str, now: float, bad_input: Any = None) -> None:
        client = self._client(cid, sink, now)
        if client is not None and bad_input:
            client.bad_input = counts_or_empty(bad_input)

    def submit(self, cid: bytes, sink: str, results_to: str, flat: list[Any], now: float,
               frames: tuple[Any, ...] = ()) -> int:
        """Take a batch; answer ACCEPTED/REJECTED. Returns the number of malformed entries.

        `sink` is the client's own (control) sink; results go to `results_to`, usually the same. A large
        payload is named by its number among the message's payload `frames`: it is kept as it came.
        """
        client = self._client(cid, sink, now)
        if client is None:
            return 0
        self._now = now
        accepted: list[int] = []
        fresh: list[int] | None = [] if self.events is not None else None
        rejected: list[Any] = []
        malformed = 0
        tasks = self.tasks
        room = self.config.max_queued - len(tasks)
        used: set[int] = set()
        last_slot: Any = None
        last_placed: tuple[int, Route | None] | None = None
        for i in range(0, len(flat) - 2, 3):
            task_id, priority, payload = flat[i], flat[i + 1], flat[i + 2]
            if type(payload) is not bytes:
                payload = payload_of(payload, frames, used)
            route = None
            if type(priority) is not int:
                if priority != last_slot:  # a batch's tasks mostly share one: parse it once
                    last_slot, last_placed = priority, parse_placement(priority)
                if last_placed is not None:
                    priority, route = last_placed
            if type(task_id) is not int or type(priority) is not int or payload is None:
                malformed += 1
                if type(task_id) is int:
                    rejected += (task_id, "malformed task entry (expected id, priority or "
                                          "[priority, tags, resources], payload)")
                continue
            held = tasks.get(task_id)
            if held is None and route is not None and route not in client.routes:
                if len(client.routes) >= MAX_ROUTES_PER_CLIENT:
                    rejected += (task_id, f"this client has tasks of {MAX_ROUTES_PER_CLIENT} different tag and "
                                          "resource sets waiting or running, its limit; wait for some to finish")
                    continue
                if route not in self.routes and sum(q.held > 0 for q in self.routes.values()) >= MAX_ROUTES:
                    rejected += (task_id, f"the scheduler holds tasks of {MAX_ROUTES} different tag and resource "
                                          "sets, its limit; wait for some to finish")
                    continue
            if held is None and task_id in self._orphans:
                self._adopt(task_id, client, results_to or sink, priority, payload, route)
                accepted.append(task_id)
                continue
            if held is not None:
                if held.client is client:
                    accepted.append(task_id)  # a resubmission of a task we hold: idempotent
                    self.counters.duplicates += 1
                else:
                    rejected += (task_id, "task id already used by another client")
                continue
            if room <= 0:
                rejected += (task_id, f"scheduler is full ({self.config.max_queued} tasks held); retry later")
                continue
            room -= 1
            task = Task(task_id, client, results_to or sink, priority, payload, route)
            task.accepted_at = task.queued_at = now
            tasks[task_id] = task
            client.tasks.add(task)
            if route is None:
                self.queue.push(task)
            else:
                self._hold_route(task).push(task)
            accepted.append(task_id)
            if fresh is not None:
                fresh.append(task_id)
        if len(flat) % 3:
            malformed += 1
        if fresh and self.events is not None:
            self.events.append((ev.SUBMITTED, client.sink, fresh))
        self.counters.submitted += len(accepted)
        client.accepted += accepted
        if len(client.accepted) >= 10_000:
            self._acknowledge(client)
        if rejected:
            self.counters.rejected += len(rejected) // 2
            self.outbox.append(("client", client.sink, encode(Rejected(self.epoch, rejected))))
        return malformed

    def _hold_route(self, task: Task) -> TaskQueue:
        """Count a new task held for its route (making the route's record); returns the route's queue."""
        assert task.route is not None
        routed = self.routes.get(task.route)
        if routed is None:
            if len(self.routes) >= MAX_ROUTES:  # make room: forget the routes no task needs now
                self.routes = {r: q for r, q in self.routes.items() if q.held > 0}
            routed = self.routes[task.route] = RoutedQueue(task.route, self.tasks)
            routed.eligible = [w for w in self.workers.values() if w.equipment.could_ever_take(task.route)]
            routed.eligible_set = set(routed.eligible)
        task.route = routed.route  # one Route object for all its tasks
        routed.held += 1
        client = task.client.routes
        client[routed.route] = client.get(routed.route, 0) + 1
        return routed.queue

    def _adopt(self, task_id: int, client: ClientRecord, sink: str, priority: int, payload: bytes,
               route: Route | None) -> None:
        """A resubmitted task that a worker reported running at (re-)registration: it is still running there."""
        worker = self._orphans.pop(task_id)
        worker.orphans.discard(task_id)
        task = Task(task_id, client, sink, priority, payload, route)
        task.accepted_at = task.queued_at = self._now
        self.tasks[task_id] = task
        client.tasks.add(task)
        queue = self.queue if route is None else self._hold_route(task)
        if self.workers.get(worker.wid) is worker:
            self._place_adopted(task, worker)
        else:
            queue.push(task)

    def _place_adopted(self, task: Task, worker: WorkerRecord) -> None:
        """Place a task that already runs on `worker`, even where a dispatch would not have put it."""
        if task.route is not None and not (worker.equipment.could_ever_take(task.route)
                                           and worker.equipment.fits(task.route) > 0):
            worker.overcommitted = True
        task.state = RUNNING
        task.worker = worker
        worker.tasks.add(task)
        if task.route is not None:
            worker.equipment.hold(task.route)

    def audit(self, cid: bytes, sink: str, ids: list[Any], now: float) -> None:
        """Tell a client which of its unfinished tasks we do not hold (their results may have been lost)."""
        client = self._client(cid, sink, now)
        if client is None:
            return
        tasks = self.tasks
        missing = [i for i in ids if type(i) is int and (tasks.get(i) is None or tasks[i].client is not client)]
        self.outbox.append(("client", client.sink, encode(Missing(self.epoch, missing))))

    def cancel(self, cid: bytes, ids: list[Any], now: float) -> None:
        client = self.clients.get(cid)
        if client is None:
            return  # only a task's own client may cancel it (its id is a secret no worker sees)
        client.last_seen = now
        mine = {i: t for i, t in ((i, self.tasks.get(i)) for i in ids if type(i) is int)
                if t is not None and t.client is client}  # by id: an id named twice is cancelled (and counted) once
        self._cancel_tasks(list(mine.values()), client_left=False)

    def _cancel_tasks(self, tasks: "list[Task]", client_left: bool) -> None:
        """Forget `tasks` and cancel the running ones on their workers.

        When their client left (it may well have its results already: a DONE can linger), a running task
        is only counted once its worker reports it: done if it finished, nothing if the cancel stopped it.
        """
        by_worker: dict[bytes, list[int]] = {}
        for task in tasks:
            worker = task.worker
            if task.state == RUNNING and worker is not None:
                by_worker.setdefault(worker.wid, []).append(task.id)
                self._detach(task, still_running=True)
                self._gained[worker] = None  # its resources, if `releasing` was full
                if client_left and len(worker.abandoned) < worker.capacity:
                    worker.abandoned.add(task.id)
                else:
                    self.counters.cancelled += 1
            else:
                self.counters.cancelled += 1
            self._forget(task)
        if self.events is not None and tasks:
            self.events.append((ev.CANCELLED, "", [t.id for t in tasks]))
        for wid, wids in by_worker.items():
            self.outbox.append(("worker", wid, encode(Cancel(b"", "", wids))))

    def client_bye(self, cid: bytes, now: float) -> None:
        client = self.clients.get(cid)
        if client is not None:
            self._drop_client(client, "said goodbye")

    def _drop_client(self, client: ClientRecord, why: str) -> None:
        (log.info if client.tasks else log.debug)("client %s %s; dropping its %d tasks", client.cid.hex(), why,
                                                  len(client.tasks))
        self._cancel_tasks(list(client.tasks), client_left=True)
        del self.clients[client.cid]
        self.outbox.append(("close", client.sink, b""))

    # ---- workers --------------------------------------------------------------------------

    def worker_hello(self, wid: bytes, name: str, session: int, free: int, running: list[Any], pid: int,
                     host: str, now: float, tags: Any = (), resources: Any = None) -> str:
        """(Re-)register a worker; tasks we thought it had but it does not run go back to the queue.
        Returns what was wrong with its tags or resources ("" if nothing; it then has none)."""
        old = self.workers.get(wid)
        old_abandoned = set(old.abandoned) if old is not None else set()
        if old is not None:
            self._remove_worker(old)
        still_running = {t for t in running[:MAX_SLOTS_PER_WORKER] if type(t) is int}
        free = max(0, min(free, MAX_SLOTS_PER_WORKER))
        name, host = name[:MAX_NAME_CHARS], host[:MAX_NAME_CHARS]
        checked_tags, checked_resources = check_tags(tags), check_resources(resources or {})
        problem = next((p for p in (checked_tags, checked_resources) if isinstance(p, str)), "")
        equipment = Equipment() if problem else Equipment(checked_tags, checked_resources)  # type: ignore[arg-type]
        worker = WorkerRecord(wid, name, session, 0, pid, host, now, capacity=free + len(still_running),
                              equipment=equipment)
        self.workers[wid] = worker
        self._worker_joined_routes(worker)
        if old is not None:
            for task in [t for t in old.tasks if t.id in still_running]:
                old.tasks.discard(task)
                task.worker = None
                self._place_adopted(task, worker)
                if old.suspect is task:
                    worker.suspect = task
            old.tasks.difference_update(worker.tasks)
            self._requeue_all([t for t in old.tasks if t.id not in still_running], died=False)
            worker.abandoned = {i for i in old_abandoned if i in still_running}
            for task_id, route in old.releasing.items():
                if task_id in still_running:
                    if not (equipment.could_ever_take(route) and equipment.fits(route) > 0):
                        worker.overcommitted = True
                    worker.releasing[task_id] = route
                    equipment.hold(route)
        room = min(MAX_ORPHANS_PER_WORKER, MAX_ORPHANS - len(self._orphans))
        for task_id in still_running:
            if room <= 0:
                break
            if task_id not in self.tasks and task_id not in worker.abandoned and task_id not in self._orphans:
                self._orphans[task_id] = worker  # e.g. we restarted: adopt it when its client resubmits it
                worker.orphans.add(task_id)
                room -= 1
        self._set_free(worker, free)
        log.info("worker %s registered (%s, pid %d on %s, %d free slots%s)", wid.hex(), name, pid, host, free,
                 "".join(f", {what}" for what in [equipment.describe()] if what))
        self.outbox.append(("worker", wid, encode(Heartbeat(self.epoch, session, 0))))
        if self.events is not None:
            self.events.append((ev.WORKER_JOINED, name, [host, pid]))
        self.dispatch()
        return problem

    def _known_worker(self, wid: bytes, now: float) -> WorkerRecord | None:
        worker = self.workers.get(wid)
        if worker is None:
            self.outbox.append(("worker", wid, encode(Register(self.epoch))))
            return None
        worker.last_seen = now
        return worker

    def worker_done(self, wid: bytes, session: int, seq: int, credit: int, finished: list[Any], n_failed: int,
                    retries: list[Any], now: float, errors: list[Any] = []) -> None:
        worker = self._known_worker(wid, now)
        if worker is None:
            return  # a peer we do not know finishes nothing: it is asked to register
        self._gained[worker] = None
        self._now = now
        if session != worker.session:
            # A stale session still reports finished tasks: their results reached the client.
            self._finish(worker, finished, n_failed, errors, now)
            return
        if seq != worker.done_seq + 1:
            log.warning("worker %s: DONE %d after %d, messages were lost; asking it to re-register",
                        wid.hex(), seq, worker.done_seq)
            self.outbox.append(("worker", wid, encode(Register(self.epoch))))
        worker.done_seq = seq
        worker.done += self._finish(worker, finished, n_failed, errors, now)
        retried: list[int] = []
        for i in range(0, len(retries) - 1, 2):
            self._released(worker, retries[i])
            task = self.tasks.get(retries[i]) if type(retries[i]) is int else None
            delay = retries[i + 1]
            if task is None or task.worker is not worker or not isinstance(delay, (int, float)):
                continue
            self._detach(task)
            task.tries += 1
            self.counters.retried += 1
            self._queue_of(task).delay(task, now + max(0.0, min(float(delay), 3600.0)))
            retried.append(task.id)
        if retried and self.events is not None:
            self.events.append((ev.RETRIED, worker.name, retried))
        self._set_free(worker, worker.free + max(0, min(credit, MAX_SLOTS_PER_WORKER)))
        self.dispatch()

    def _finish(self, worker: WorkerRecord, finished: list[Any], n_failed: Any, errors: list[Any] = [],
                now: float = 0.0) -> int:
        """Finish the tasks of `finished` that run on `worker` (nobody else's); returns how many. ``errors``
        (flat ``[id, type, message, ...]``) says which failed and why, for `recent_failures` and events."""
        tasks = self.tasks
        n = 0
        releasing = worker.releasing
        ours: list[int] | None = [] if self.events is not None or errors else None
        for task_id in finished:
            if type(task_id) is not int:
                continue
            if releasing:
                self._released(worker, task_id)
            task = tasks.get(task_id)
            if task is not None:
                if task.worker is not worker:
                    continue  # not on this worker: a DONE cannot finish another worker's (or a queued) task
                del tasks[task_id]
                self._release_route(task)
                if self.round_trip is not None:
                    self.round_trip.observe(now - task.accepted_at)
                task.state = GONE
                task.client.tasks.discard(task)
                self._detach(task)
                n += 1
                if ours is not None:
                    ours.append(task_id)
            elif task_id in worker.abandoned:  # its client left: reported cancelled then, counted now
                worker.abandoned.discard(task_id)
                n += 1
            elif task_id in worker.orphans:
                worker.orphans.discard(task_id)
                if self._orphans.get(task_id) is worker:
                    del self._orphans[task_id]
        if worker.overcommitted and not worker.equipment.over() and all(
                t.route is None or worker.equipment.tags >= t.route.tags for t in worker.tasks):
            worker.overcommitted = False  # what it was given beyond its means has finished
        failed = min(n, n_failed) if type(n_failed) is int and n_failed > 0 else 0
        self.counters.failed += failed
        self.counters.done += n - failed
        if ours:
            self._report_finished(worker, ours, errors, now)
        return n

    @staticmethod
    def _released(worker: WorkerRecord, task_id: Any) -> None:
        """The worker no longer runs `task_id` (finished, to retry, handed back): a cancelled task's
        resources, held until now, come back."""
        route = worker.releasing.pop(task_id, None) if worker.releasing else None
        if route is not None:
            worker.equipment.hold(route, -1)

    def _report_finished(self, worker: WorkerRecord, ours: list[int], errors: list[Any], now: float) -> None:
        """Failures (only of tasks this DONE finished here) into `recent_failures`, and the events."""
        failures: list[Any] = []
        if errors:
            mine = set(ours)
            for i in range(0, min(len(errors), 3 * MAX_ERRORS_PER_DONE) - 2, 3):
                task_id, type_name, message = errors[i], errors[i + 1], errors[i + 2]
                if type(task_id) is int and task_id in mine and type(type_name) is str and type(message) is str:
                    mine.discard(task_id)
                    type_name, message = type_name[:100], message[:300]
                    failures += (task_id, type_name, message)
                    if type_name:  # past the worker's first 100 a DONE names failures without their error
                        self.recent_failures.append({"task": task_id, "worker": worker.name, "type": type_name,
                                                     "message": message, "t": now})
        if self.events is not None:
            if failures:
                failed_ids = set(failures[0::3])
                self.events.append((ev.DONE, worker.name, [i for i in ours if i not in failed_ids]))
                self.events.append((ev.FAILED, worker.name, failures))
            else:
                self.events.append((ev.DONE, worker.name, ours))

    def worker_heartbeat(self, wid: bytes, session: int, done_seq: int, now: float, bad_input: Any = None) -> None:
        worker = self._known_worker(wid, now)
        if worker is not None and bad_input:
            worker.bad_input = counts_or_empty(bad_input)
        if worker is not None and session == worker.session and done_seq != worker.done_seq:
            log.warning("worker %s sent DONE %d but %d arrived last; asking it to re-register",
                        wid.hex(), done_seq, worker.done_seq)
            self.outbox.append(("worker", wid, encode(Register(self.epoch))))

    def worker_drain(self, wid: bytes, session: int, handed_back: list[Any], now: float) -> None:
        worker = self._known_worker(wid, now)
        if worker is None:
            return
        self._set_free(worker, 0)
        worker.draining = True
        back = {t for t in handed_back if type(t) is int}
        for task_id in back:
            self._released(worker, task_id)
        self._requeue_all([t for t in worker.tasks if t.id in back], died=False)
        log.info("worker %s draining; %d tasks handed back", wid.hex(), len(back))
        if self.events is not None:
            self.events.append((ev.WORKER_DRAINING, worker.name, len(back)))
        self.dispatch()

    def worker_bye(self, wid: bytes, now: float) -> None:
        worker = self.workers.get(wid)
        if worker is not None:
            self._remove_worker(worker)
            log.info("worker %s left; %d tasks go back to the queue", wid.hex(), len(worker.tasks))
            if self.events is not None:
                self.events.append((ev.WORKER_LEFT, worker.name, ""))
            self._requeue_all(worker.tasks, died=False)
            self.dispatch()

    def worker_lost(self, wid: bytes, why: str) -> None:
        """A worker died (silent too long, or unreachable): its tasks run elsewhere."""
        worker = self.workers.get(wid)
        if worker is None:
            return
        self._remove_worker(worker)
        # A worker that held nothing and vanished (a clean exit whose goodbye crossed our heartbeat) is news,
        # not a warning.
        (log.warning if worker.tasks else log.info)("worker %s (%s, pid %d) lost: %s; redelivering %d tasks",
                                                    wid.hex(), worker.name, worker.pid, why, len(worker.tasks))
        if self.events is not None:
            self.events.append((ev.WORKER_LOST, worker.name, why))
        self._requeue_all(worker.tasks, died=True)
        self.dispatch()

    def _requeue_all(self, tasks: "set[Task] | list[Task]", died: bool) -> None:
        """Back to the queue, oldest (lowest id) first, ahead of tasks never tried.

        A worker's death is no evidence against any one task that shared it: after `max_deaths - 1` such
        deaths a task becomes a suspect and runs isolated, in a child process of its next worker (one
        suspect per worker at a time), where a death names the task for certain (the worker reports it
        LOST). Only a suspect whose workers themselves keep dying, `MAX_LOST_ALONE` times, is failed here.
        """
        front: list[Task] = []
        suspect_after = max(1, self.config.max_deaths - 1)
        moved: list[int] | None = [] if self.events is not None else None
        who = ""
        for task in sorted(tasks, key=lambda t: t.id):
            isolated = task.worker is not None and task.worker.suspect is task
            if moved is not None and task.worker is not None:
                who = task.worker.name
            self._detach(task)
            if died:
                if isolated:
                    task.lost_alone += 1
                    if task.lost_alone >= MAX_LOST_ALONE:
                        self._fail_lost(task)
                        continue
                else:
                    task.deaths += 1
            if moved is not None:
                moved.append(task.id)
            task.queued_at = self._now
            self.counters.redelivered += 1
            if task.deaths >= suspect_after:
                self._queue_of(task).push_suspect(task)
            else:
                front.append(task)
        for task in reversed(front):
            self._queue_of(task).push(task, front=True)
        if moved and self.events is not None:
            self.events.append((ev.REDELIVERED, who, moved))

    def _fail_lost(self, task: Task) -> None:
        self.counters.lost += 1
        text = (f"the task was running on {task.deaths + task.lost_alone} workers that died, "
                f"{task.lost_alone} of them while it ran alone; it is probably killing them")
        self.outbox.append(("client", task.sink,
                            encode(Result([task.id, Status.LOST, encode_error("WorkerLost", text)]))))
        self.recent_failures.append({"task": task.id, "worker": "", "type": "WorkerLost", "message": text,
                                     "t": self._now})
        if self.events is not None:
            self.events.append((ev.FAILED, "", [task.id, "WorkerLost", text]))
        self._forget(task)

    # ---- dispatch -------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued tasks to workers with free slots, most free first, in one frame per worker.
        Routed tasks go first: fewer workers can take them."""
        if self.routes and self.free_total > 0:
            for routed in self.routes.values():
                if routed.queue.n_ready or routed.queue.n_suspects:
                    self._dispatch_route(routed)
                else:
                    routed.blocked = False  # what it waited for may come while it has nothing to send
        self._gained.clear()
        if self.queue.n_suspects:
            self._dispatch_suspects()
        free_total = self.free_total
        remaining = min(self.queue.n_ready, free_total)
        if remaining <= 0:
            return
        # Most free first, each worker a share in proportion to its free slots, no less than `least`. Every
        # worker popped gets at least one task, so a dispatch costs O(tasks * log workers), whatever the
        # number of workers.
        ready, workers = self._ready, self.workers
        least = max(MIN_SHARE, min(MAX_SHARE, int(self.finish_rate) // DISPATCHES_PER_S))
        served: list[WorkerRecord] = []
        seen: set[WorkerRecord] = set()
        while remaining > 0 and ready:
            negfree, _, worker = heapq.heappop(ready)
            if (-negfree != worker.free or worker.free <= 0 or worker.draining or worker in seen
                    or workers.get(worker.wid) is not worker):
                continue  # stale entry
            share = min(worker.free, remaining, max(least, -(-remaining * worker.free // free_total)))
            free_total -= worker.free
            served.append(worker)
            seen.add(worker)
            batch = self.queue.pop(share)
            if not batch:
                break
            remaining -= len(batch)
            self._send_batch(worker, batch)
        for worker in served:
            self._offer(worker)

    def _eligible(self, routed: RoutedQueue) -> list[WorkerRecord]:
        """The live workers that have the route's tags and enough of its resources for one task (kept as
        workers come and go; departed ones are dropped from the list lazily)."""
        eligible, live = routed.eligible, routed.eligible_set
        if len(eligible) != len(live):
            if len(eligible) > 2 * len(live) + 8:
                routed.eligible = eligible = [w for w in eligible if w in live]
            else:
                return [w for w in eligible if w in live]
        return eligible

    def _worker_joined_routes(self, worker: WorkerRecord) -> None:
        for routed in self.routes.values():
            if worker.equipment.could_ever_take(routed.route):
                routed.eligible.append(worker)
                routed.eligible_set.add(worker)
        self._gained[worker] = None  # blocked routes look at it

    def _dispatch_route(self, routed: RoutedQueue) -> None:
        """Hand one route's tasks to the workers that can take them, each in turn, as far as their free
        slots and resources left allow. A blocked route (its last dispatch left ready tasks: every eligible
        worker was full for it) looks only at the workers that gained room since, so that many routes
        waiting on busy workers do not cost every dispatch routes × workers."""
        if routed.blocked:
            workers = [w for w in self._gained if w in routed.eligible_set]
        else:
            workers = self._eligible(routed)
        if workers:
            self._fill_route(routed, workers)
        routed.blocked = routed.queue.n_ready > 0

    def _fill_route(self, routed: RoutedQueue, workers: list[WorkerRecord]) -> None:
        """Suspects one per worker; then, from a different worker each time so equal workers take turns,
        each a share of the ready tasks (no less than `least`, as in `dispatch`), and in a second round all
        its room allows. Stops as soon as the tasks are placed: a dispatch need not look at every worker."""
        queue, route = routed.queue, routed.route
        if queue.n_suspects:
            for worker in workers:
                if worker.suspect is None and worker.free > 0 and not worker.draining and worker.equipment.fits(route):
                    task = queue.pop_suspect()
                    if task is None:
                        break
                    self._send_batch(worker, [task], isolate=True)
                    worker.suspect = task
                    self._offer(worker)
        remaining = queue.n_ready
        if not remaining:
            return
        n = len(workers)
        least = max(MIN_SHARE, min(MAX_SHARE, int(self.finish_rate) // DISPATCHES_PER_S))
        share_cap = max(least, -(-remaining // n))
        start = routed.turn % n
        routed.turn = start + 1
        for second_round in (False, True):
            for k in range(n):
                if remaining <= 0 or self.free_total <= 0:
                    return
                worker = workers[(start + k) % n]
                if worker.free <= 0 or worker.draining:
                    continue
                room = min(worker.free, worker.equipment.fits(route), remaining)
                batch = queue.pop(room if second_round else min(room, share_cap))
                if not batch:
                    continue
                remaining -= len(batch)
                self._send_batch(worker, batch)
                self._offer(worker)

    def _dispatch_suspects(self) -> None:
        for worker in self.workers.values():
            if worker.suspect is None and worker.free > 0 and not worker.draining:
                task = self.queue.pop_suspect()
                if task is None:
                    return
                self._send_batch(worker, [task], isolate=True)
                worker.suspect = task
                self._offer(worker)

    def _send_batch(self, worker: WorkerRecord, batch: list[Task], isolate: bool = False) -> None:
        worker.free -= len(batch)
        self.free_total -= len(batch)
        by_sink: dict[str, list[Any]] = {}
        frames: list[Any] = []
        size = count = 0
        waits = self.queue_wait
        for task in batch:
            task.state = RUNNING
            task.worker = worker
            worker.tasks.add(task)
            if task.route is not None:
                worker.equipment.hold(task.route)
            if waits is not None:
                waits.observe(self._now - task.queued_at)
            entry = by_sink.get(task.sink)
            if entry is None:
                entry = by_sink[task.sink] = []
            payload = task.payload
            n = len(payload)
            entry += (task.id, task.tries, payload if n < PAYLOAD_FRAME_BYTES and type(payload) is bytes
                      else attach(payload, frames))  # passed on as it came: never copied here
            size += n
            count += 1
            if size > MAX_BATCH_BYTES or count >= MAX_BATCH_TASKS or len(frames) >= MAX_PAYLOAD_FRAMES:
                self._emit_dispatch(worker, by_sink, frames, isolate)
                by_sink, frames, size, count = {}, [], 0, 0
        if by_sink:
            self._emit_dispatch(worker, by_sink, frames, isolate)

    def _emit_dispatch(self, worker: WorkerRecord, by_sink: dict[str, list[Any]], frames: list[Any],
                       isolate: bool) -> None:
        """One DISPATCH: groups ``[sink, flat]``, or ``[sink, flat, 1]`` for tasks to run in a child process."""
        worker.dispatch_seq += 1
        groups = [[sink, flat, 1] if isolate else [sink, flat] for sink, flat in by_sink.items()]
        if self.events is not None:
            self.events.append((ev.DISPATCHED, worker.name, [i for flat in by_sink.values() for i in flat[0::3]]))
        self.outbox.append(("worker", worker.wid,
                            encode(Dispatch(self.epoch, worker.session, worker.dispatch_seq, groups, tuple(frames)))))

    # ---- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Heartbeats out, silent peers expired, due retries queued, the finishing rate sampled."""
        timing = self.config.timing
        self._now = now
        finished = self.counters.done + self.counters.failed
        if self._rate_mark is not None and now > self._rate_mark[0]:
            sample = (finished - self._rate_mark[1]) / (now - self._rate_mark[0])
            self.finish_rate += (sample - self.finish_rate) / 2
        self._rate_mark = (now, finished)
        if now - self._last_heartbeat >= timing.heartbeat_s:
            self._last_heartbeat = now
            for worker in self.workers.values():
                self.outbox.append(("worker", worker.wid,
                                    encode(Heartbeat(self.epoch, worker.session, worker.dispatch_seq))))
            beat = encode(Heartbeat(self.epoch, 0, 0))
            for client in self.clients.values():
                self.outbox.append(("client", client.sink, beat))
        for client in self.clients.values():
            self._acknowledge(client)
        for worker in [w for w in self.workers.values() if now - w.last_seen > timing.worker_timeout_s]:
            self.worker_lost(worker.wid, f"silent for {now - worker.last_seen:.1f} s")
        idle_s = 3 * timing.heartbeat_s  # a live client says hello every heartbeat
        for client in [c for c in self.clients.values() if now - c.last_seen > timing.client_timeout_s
                       or (not c.tasks and now - c.last_seen > idle_s)]:
            self._drop_client(client, f"silent for {now - client.last_seen:.1f} s")
        for queue in [self.queue, *(routed.queue for routed in self.routes.values())]:
            if queue.n_delayed:
                for task in queue.due(now):
                    task.queued_at = now
                    queue.push(task, front=True)
        self.dispatch()

    def validate(self) -> None:
        """Check every invariant; raise AssertionError naming the first broken one (tests call it after
        every event)."""
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise AssertionError(what)
        n_queued = n_suspects = 0
        by_route: dict[Route, list[Task]] = {}
        for task_id, task in self.tasks.items():
            if task.route is not None:
                by_route.setdefault(task.route, []).append(task)
            check(task.id == task_id, f"task {task_id} indexed under another id")
            check(self.clients.get(task.client.cid) is task.client and task in task.client.tasks,
                  f"task {task_id} not held by a live client")
            if task.state == RUNNING:
                worker = task.worker
                check(worker is not None and self.workers.get(worker.wid) is worker and task in worker.tasks,
                      f"running task {task_id} not on a live worker")
            else:
                check(task.worker is None, f"task {task_id} in state {task.state} is on a worker")
                check(task.state in (QUEUED, SUSPECT, DELAYED), f"task {task_id} in unknown state {task.state}")
            n_queued += task.state == QUEUED and task.route is None
            n_suspects += task.state == SUSPECT and task.route is None
        check(self.queue.n_ready == n_queued, f"queue counts {self.queue.n_ready} ready, {n_queued} are")
        check(self.queue.n_suspects == n_suspects, f"queue counts {self.queue.n_suspects} suspects, {n_suspects} are")
        check(set(by_route) <= set(self.routes), "tasks of a route not held")
        check(all(q.held == 0 and not len(q.queue) for r, q in self.routes.items() if r not in by_route),
              "a route without tasks counts some")
        check(len(self.routes) <= MAX_ROUTES, "too many routes")
        for route, held in by_route.items():
            routed = self.routes[route]
            what = route.describe()
            check(routed.route == route and routed.held == len(held), f"route {what}: held {routed.held}, {len(held)} are")
            check(routed.queue.n_ready == sum(t.state == QUEUED for t in held), f"route {what}: ready count")
            check(routed.queue.n_suspects == sum(t.state == SUSPECT for t in held), f"route {what}: suspect count")
            check(all(t.route is routed.route for t in held), f"route {what}: tasks hold copies of the route")
            check(routed.eligible_set == {w for w in self.workers.values() if w.equipment.could_ever_take(route)},
                  f"route {what}: eligible workers")
            check(routed.eligible_set <= set(routed.eligible), f"route {what}: eligible list")
        for client in self.clients.values():
            mine: dict[Route, int] = {}
            for task in client.tasks:
                if task.route is not None:
                    mine[task.route] = mine.get(task.route, 0) + 1
            check(mine == client.routes, f"client {client.cid.hex()}: routes {client.routes}, its tasks {mine}")
            check(len(client.routes) <= MAX_ROUTES_PER_CLIENT, f"client {client.cid.hex()}: too many routes")
        for client in self.clients.values():
            check(all(self.tasks.get(t.id) is t for t in client.tasks), f"client {client.cid.hex()} holds a gone task")
        free_total = 0
        live_ready = {id(w) for _, _, w in self._ready}
        for wid, worker in self.workers.items():
            check(worker.wid == wid, "worker indexed under another id")
            check(0 <= worker.free and worker.free + len(worker.tasks) <= worker.capacity,
                  f"worker {wid.hex()}: {worker.free} free + {len(worker.tasks)} running > {worker.capacity} slots")
            check(all(t.worker is worker and t.state == RUNNING for t in worker.tasks),
                  f"worker {wid.hex()} holds a task that is not running on it")
            check(worker.suspect is None or worker.suspect in worker.tasks, f"worker {wid.hex()}: stale suspect")
            check(all(self._orphans.get(i) is worker for i in worker.orphans), f"worker {wid.hex()}: orphan index")
            check(len(worker.abandoned) <= worker.capacity, f"worker {wid.hex()}: too many abandoned tasks")
            holding = Equipment()
            for route in worker.releasing.values():
                holding.hold(route)
            for task in worker.tasks:
                if task.route is not None:
                    holding.hold(task.route)
                    check(worker.overcommitted or worker.equipment.tags >= task.route.tags,
                          f"worker {wid.hex()} runs a task needing {task.route.describe()} it has not")
            check(holding.used == worker.equipment.used,
                  f"worker {wid.hex()}: holds {worker.equipment.used}, its tasks need {holding.used}")
            check(worker.overcommitted or not worker.equipment.over(),
                  f"worker {wid.hex()}: holds {worker.equipment.used} of {worker.equipment.resources}")
            if not worker.draining:
                free_total += worker.free
                check(worker.free == 0 or id(worker) in live_ready, f"worker {wid.hex()} has free slots, not offered")
        check(free_total == self.free_total, f"free_total {self.free_total}, workers have {free_total}")
        check(len(self._orphans) <= MAX_ORPHANS, "too many orphans")
        check(all(i in w.orphans and self.workers.get(w.wid) is w for i, w in self._orphans.items()),
              "an orphan of a worker that is gone")

    def waiting(self) -> list[dict[str, Any]]:
        """The routes with tasks waiting, each with how many live workers could ever take them."""
        out = []
        for routed in self.routes.values():
            queued = len(routed.queue)
            if queued:
                takers = [w for w in self._eligible(routed) if not w.draining]
                out.append({"tags": sorted(routed.route.tags), "resources": routed.route.amounts(),
                            "queued": queued, "workers": len(takers),
                            "busy": sum(1 for w in takers if w.free <= 0 or not w.equipment.fits(routed.route))})
        return out

    def status(self) -> dict[str, Any]:
        running = sum(len(w.tasks) for w in self.workers.values())
        return {
            "epoch": self.epoch,
            "workers": [
                {"id": w.wid.hex(), "name": w.name, "pid": w.pid, "host": w.host, "free": w.free,
                 "running": len(w.tasks), "done": w.done, "draining": w.draining, "bad_input": w.bad_input,
                 **w.equipment.status()}
                for w in self.workers.values()],
            "client_list": [{"sink": c.sink, "tasks": len(c.tasks), "bad_input": c.bad_input}
                            for c in self.clients.values()],
            "recent_failures": list(self.recent_failures),
            "waiting": self.waiting(),
            "clients": len(self.clients),
            "evicted_or_refused_clients": self.refused_clients,
            "queued": self.n_queued,
            "suspects": self.queue.n_suspects + sum(r.queue.n_suspects for r in self.routes.values()),
            "delayed": self.queue.n_delayed + sum(r.queue.n_delayed for r in self.routes.values()),
            "running": running,
            **vars(self.counters),
        }
