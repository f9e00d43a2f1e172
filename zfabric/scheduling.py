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

import logging
from typing import Any

from .config import SchedulerConfig
from .protocol import MAX_BATCH_BYTES, MAX_BATCH_TASKS, Kind, Status, encode, encode_error
from .queueing import TaskQueue
from .records import GONE, RUNNING, ClientRecord, Counters, Task, WorkerRecord

log = logging.getLogger(__name__)

MAX_ORPHANS_PER_WORKER = 100_000

Outgoing = tuple[str, Any, bytes]
"""("worker", routing_id, frame) or ("client", sink_address, frame) or ("close", sink_address, b"")."""


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
        self.queue = TaskQueue(self.tasks)
        self._orphans: dict[int, WorkerRecord] = {}  # running on a worker, not (yet) resubmitted to us
        self._last_heartbeat = float("-inf")
        self.refused_clients = 0  # evicted to make room, or refused for lack of it

    # ---- indexes --------------------------------------------------------------------------

    @property
    def n_queued(self) -> int:
        return len(self.queue)

    def _forget(self, task: Task) -> None:
        """Remove a task from every index (a queued one is skipped lazily when popped)."""
        if self.tasks.get(task.id) is task:
            del self.tasks[task.id]
        self.queue.discard(task)
        task.state = GONE
        task.client.tasks.discard(task)
        self._detach(task)

    @staticmethod
    def _detach(task: Task) -> None:
        worker = task.worker
        if worker is not None:
            worker.tasks.discard(task)
            if worker.suspect is task:
                worker.suspect = None
            task.worker = None

    # ---- clients --------------------------------------------------------------------------

    def _client(self, cid: bytes, sink: str, now: float) -> ClientRecord | None:
        """The client's record (registering it, with a WELCOME); None when the scheduler has no room."""
        client = self.clients.get(cid)
        if client is None:
            if len(self.clients) >= self.config.max_clients and not self._evict_idle_client():
                self.refused_clients += 1
                return None
            client = self.clients[cid] = ClientRecord(cid, sink, now)
            log.info("client %s registered (sink %s)", cid.hex(), sink)
            self.outbox.append(("client", sink, encode(Kind.WELCOME, self.epoch, self.config.timing.heartbeat_s)))
        client.last_seen = now
        return client

    def _acknowledge(self, client: ClientRecord) -> None:
        """ACCEPTED goes out in batches (each tick), off the path of a lone task's latency."""
        if client.accepted:
            self.outbox.append(("client", client.sink, encode(Kind.ACCEPTED, self.epoch, client.accepted)))
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

    def client_hello(self, cid: bytes, sink: str, now: float) -> None:
        self._client(cid, sink, now)

    def submit(self, cid: bytes, sink: str, results_to: str, flat: list[Any], now: float) -> int:
        """Take a batch; answer ACCEPTED/REJECTED. Returns the number of malformed entries.

        `sink` is the client's own (control) sink; results go to `results_to`, usually the same.
        """
        client = self._client(cid, sink, now)
        if client is None:
            return 0
        accepted: list[int] = []
        rejected: list[Any] = []
        malformed = 0
        tasks = self.tasks
        room = self.config.max_queued - len(tasks)
        for i in range(0, len(flat) - 2, 3):
            task_id, priority, payload = flat[i], flat[i + 1], flat[i + 2]
            if type(task_id) is not int or type(priority) is not int or type(payload) is not bytes:
                malformed += 1
                if type(task_id) is int:
                    rejected += (task_id, "malformed task entry (expected id, priority, payload)")
                continue
            held = tasks.get(task_id)
            if held is None and task_id in self._orphans:
                self._adopt(task_id, client, results_to or sink, priority, payload)
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
            task = Task(task_id, client, results_to or sink, priority, payload)
            tasks[task_id] = task
            client.tasks.add(task)
            self.queue.push(task)
            accepted.append(task_id)
        if len(flat) % 3:
            malformed += 1
        self.counters.submitted += len(accepted)
        client.accepted += accepted
        if len(client.accepted) >= 10_000:
            self._acknowledge(client)
        if rejected:
            self.counters.rejected += len(rejected) // 2
            self.outbox.append(("client", client.sink, encode(Kind.REJECTED, self.epoch, rejected)))
        return malformed

    def _adopt(self, task_id: int, client: ClientRecord, sink: str, priority: int, payload: bytes) -> None:
        """A resubmitted task that a worker reported running at (re-)registration: it is still running there."""
        worker = self._orphans.pop(task_id)
        task = Task(task_id, client, sink, priority, payload)
        self.tasks[task_id] = task
        client.tasks.add(task)
        if self.workers.get(worker.wid) is worker:
            task.state = RUNNING
            task.worker = worker
            worker.tasks.add(task)
        else:
            self.queue.push(task)

    def audit(self, cid: bytes, sink: str, ids: list[Any], now: float) -> None:
        """Tell a client which of its unfinished tasks we do not hold (their results may have been lost)."""
        client = self._client(cid, sink, now)
        if client is None:
            return
        tasks = self.tasks
        missing = [i for i in ids if type(i) is int and (tasks.get(i) is None or tasks[i].client is not client)]
        self.outbox.append(("client", client.sink, encode(Kind.MISSING, self.epoch, missing)))

    def cancel(self, cid: bytes, ids: list[Any], now: float) -> None:
        client = self.clients.get(cid)
        if client is None:
            return  # only a task's own client may cancel it
        client.last_seen = now
        by_worker: dict[bytes, list[int]] = {}
        for task_id in ids:
            task = self.tasks.get(task_id) if type(task_id) is int else None
            if task is None or task.client is not client:
                continue
            self.counters.cancelled += 1
            if task.state == RUNNING and task.worker is not None:
                by_worker.setdefault(task.worker.wid, []).append(task_id)
            self._forget(task)
        for wid, wids in by_worker.items():
            self.outbox.append(("worker", wid, encode(Kind.CANCEL, b"", "", wids)))

    def client_bye(self, cid: bytes, now: float) -> None:
        client = self.clients.get(cid)
        if client is not None:
            self._drop_client(client, "said goodbye")

    def _drop_client(self, client: ClientRecord, why: str) -> None:
        (log.info if client.tasks else log.debug)("client %s %s; dropping its %d tasks", client.cid.hex(), why,
                                                  len(client.tasks))
        self.cancel(client.cid, [t.id for t in client.tasks], client.last_seen)
        del self.clients[client.cid]
        self.outbox.append(("close", client.sink, b""))

    # ---- workers --------------------------------------------------------------------------

    def worker_hello(self, wid: bytes, name: str, session: int, free: int, running: list[Any], pid: int,
                     host: str, now: float) -> None:
        """(Re-)register a worker; tasks we thought it had but it does not run go back to the queue."""
        old = self.workers.get(wid)
        if old is not None:
            self._forget_orphans(old)
        worker = WorkerRecord(wid, name, session, max(0, free), pid, host, now)
        self.workers[wid] = worker
        still_running = {t for t in running if type(t) is int}
        if old is not None:
            for task in [t for t in old.tasks if t.id in still_running]:
                worker.tasks.add(task)
                task.worker = worker
            self._requeue_all([t for t in old.tasks if t.id not in still_running], died=False)
        for task_id in list(still_running)[:MAX_ORPHANS_PER_WORKER]:
            if task_id not in self.tasks:  # e.g. we restarted: adopt it when its client resubmits it
                self._orphans[task_id] = worker
        log.info("worker %s registered (%s, pid %d on %s, %d free slots)", wid.hex(), name, pid, host, free)
        self.outbox.append(("worker", wid, encode(Kind.HEARTBEAT, self.epoch, session, 0)))
        self.dispatch()

    def _known_worker(self, wid: bytes, now: float) -> WorkerRecord | None:
        worker = self.workers.get(wid)
        if worker is None:
            self.outbox.append(("worker", wid, encode(Kind.REGISTER, self.epoch)))
            return None
        worker.last_seen = now
        return worker

    def worker_done(self, wid: bytes, session: int, seq: int, credit: int, finished: list[Any], n_failed: int,
                    retries: list[Any], now: float) -> None:
        worker = self._known_worker(wid, now)
        if worker is None or session != worker.session:
            # A stale session still reports finished tasks: their results reached the client.
            self._finish(finished)
            return
        if seq != worker.done_seq + 1:
            log.warning("worker %s: DONE %d after %d, messages were lost; asking it to re-register",
                        wid.hex(), seq, worker.done_seq)
            self.outbox.append(("worker", wid, encode(Kind.REGISTER, self.epoch)))
        worker.done_seq = seq
        worker.free += max(0, credit)
        worker.done += len(finished)
        self.counters.failed += max(0, n_failed)
        self._finish(finished)
        for i in range(0, len(retries) - 1, 2):
            task = self.tasks.get(retries[i]) if type(retries[i]) is int else None
            delay = retries[i + 1]
            if task is None or task.worker is not worker or not isinstance(delay, (int, float)):
                continue
            self._detach(task)
            task.tries += 1
            self.counters.retried += 1
            self.queue.delay(task, now + max(0.0, min(float(delay), 3600.0)))
        self.dispatch()

    def _finish(self, finished: list[Any]) -> None:
        tasks = self.tasks
        n = 0
        orphans = self._orphans
        for task_id in finished:
            if type(task_id) is not int:
                continue
            task = tasks.pop(task_id, None)
            if task is None:
                if orphans:
                    orphans.pop(task_id, None)
                continue
            n += 1
            self.queue.discard(task)  # it may be queued again: a late DONE from a worker declared lost
            task.state = GONE
            task.client.tasks.discard(task)
            self._detach(task)
        self.counters.done += n

    def worker_heartbeat(self, wid: bytes, session: int, done_seq: int, now: float) -> None:
        worker = self._known_worker(wid, now)
        if worker is not None and session == worker.session and done_seq != worker.done_seq:
            log.warning("worker %s sent DONE %d but %d arrived last; asking it to re-register",
                        wid.hex(), done_seq, worker.done_seq)
            self.outbox.append(("worker", wid, encode(Kind.REGISTER, self.epoch)))

    def worker_drain(self, wid: bytes, session: int, handed_back: list[Any], now: float) -> None:
        worker = self._known_worker(wid, now)
        if worker is None:
            return
        worker.draining = True
        worker.free = 0
        back = {t for t in handed_back if type(t) is int}
        self._requeue_all([t for t in worker.tasks if t.id in back], died=False)
        log.info("worker %s draining; %d tasks handed back", wid.hex(), len(back))
        self.dispatch()

    def worker_bye(self, wid: bytes, now: float) -> None:
        worker = self.workers.pop(wid, None)
        if worker is not None:
            self._forget_orphans(worker)
            log.info("worker %s left; %d tasks go back to the queue", wid.hex(), len(worker.tasks))
            self._requeue_all(worker.tasks, died=False)
            self.dispatch()

    def worker_lost(self, wid: bytes, why: str) -> None:
        """A worker died (silent too long, or unreachable): its tasks run elsewhere."""
        worker = self.workers.pop(wid, None)
        if worker is None:
            return
        self._forget_orphans(worker)
        log.warning("worker %s (%s, pid %d) lost: %s; redelivering %d tasks",
                    wid.hex(), worker.name, worker.pid, why, len(worker.tasks))
        self._requeue_all(worker.tasks, died=True)
        self.dispatch()

    def _forget_orphans(self, worker: WorkerRecord) -> None:
        if self._orphans:
            for task_id in [i for i, w in self._orphans.items() if w is worker]:
                del self._orphans[task_id]

    def _requeue_all(self, tasks: "set[Task] | list[Task]", died: bool) -> None:
        """Back to the queue, oldest (lowest id) first, ahead of tasks never tried."""
        front: list[Task] = []
        for task in sorted(tasks, key=lambda t: t.id):
            self._detach(task)
            if died:
                task.deaths += 1
                if task.deaths >= self.config.max_deaths:
                    self._fail_lost(task)
                    continue
            self.counters.redelivered += 1
            if task.deaths >= 2:
                # Twice on a dying worker: maybe it is what kills them. Run it alone so it cannot
                # take other tasks' attempts with it (one suspect per worker at a time).
                self.queue.push_suspect(task)
            else:
                front.append(task)
        for task in reversed(front):
            self.queue.push(task, front=True)

    def _fail_lost(self, task: Task) -> None:
        self.counters.lost += 1
        text = (f"the task was running on {task.deaths} workers that died "
                f"(limit {self.config.max_deaths}); it is probably killing them")
        self.outbox.append(("client", task.sink,
                            encode(Kind.RESULT, [task.id, Status.LOST, encode_error("WorkerLost", text)])))
        self._forget(task)

    # ---- dispatch -------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued tasks to workers with free slots, most free first, in one frame per worker."""
        if self.queue.n_suspects:
            self._dispatch_suspects()
        if not self.queue.n_ready:
            return
        ready = [w for w in self.workers.values() if w.free > 0 and not w.draining]
        if not ready:
            return
        ready.sort(key=lambda w: w.free, reverse=True)
        free_total = sum(w.free for w in ready)
        remaining = min(self.queue.n_ready, free_total)
        for worker in ready:
            if remaining <= 0:
                break
            share = min(worker.free, remaining, -(-remaining * worker.free // free_total))
            free_total -= worker.free
            batch = self.queue.pop(share)
            if not batch:
                break
            remaining -= len(batch)
            self._send_batch(worker, batch)

    def _dispatch_suspects(self) -> None:
        for worker in self.workers.values():
            if worker.suspect is None and worker.free > 0 and not worker.draining:
                task = self.queue.pop_suspect()
                if task is None:
                    return
                self._send_batch(worker, [task])
                worker.suspect = task

    def _send_batch(self, worker: WorkerRecord, batch: list[Task]) -> None:
        worker.free -= len(batch)
        by_sink: dict[str, list[Any]] = {}
        size = count = 0
        for task in batch:
            task.state = RUNNING
            task.worker = worker
            worker.tasks.add(task)
            entry = by_sink.get(task.sink)
            if entry is None:
                entry = by_sink[task.sink] = []
            entry += (task.id, task.tries, task.payload)
            size += len(task.payload)
            count += 1
            if size > MAX_BATCH_BYTES or count >= MAX_BATCH_TASKS:
                self._emit_dispatch(worker, by_sink)
                by_sink, size, count = {}, 0, 0
        if by_sink:
            self._emit_dispatch(worker, by_sink)

    def _emit_dispatch(self, worker: WorkerRecord, by_sink: dict[str, list[Any]]) -> None:
        worker.dispatch_seq += 1
        groups = [[sink, flat] for sink, flat in by_sink.items()]
        self.outbox.append(("worker", worker.wid,
                            encode(Kind.DISPATCH, self.epoch, worker.session, worker.dispatch_seq, groups)))

    # ---- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Heartbeats out, silent peers expired, due retries queued."""
        timing = self.config.timing
        if now - self._last_heartbeat >= timing.heartbeat_s:
            self._last_heartbeat = now
            for worker in self.workers.values():
                self.outbox.append(("worker", worker.wid,
                                    encode(Kind.HEARTBEAT, self.epoch, worker.session, worker.dispatch_seq)))
            beat = encode(Kind.HEARTBEAT, self.epoch, 0, 0)
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
        for task in self.queue.due(now):
            self.queue.push(task, front=True)
        self.dispatch()

    def status(self) -> dict[str, Any]:
        running = sum(len(w.tasks) for w in self.workers.values())
        return {
            "epoch": self.epoch,
            "workers": [
                {"id": w.wid.hex(), "name": w.name, "pid": w.pid, "host": w.host, "free": w.free,
                 "running": len(w.tasks), "done": w.done, "draining": w.draining}
                for w in self.workers.values()],
            "clients": len(self.clients),
            "evicted_or_refused_clients": self.refused_clients,
            "queued": len(self.queue),
            "suspects": self.queue.n_suspects,
            "delayed": self.queue.n_delayed,
            "running": running,
            **vars(self.counters),
        }
