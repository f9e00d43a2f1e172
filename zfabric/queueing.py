"""Tasks waiting for a worker (layer 3: imports records and routing).

The rule it keeps: highest priority first, first in first out within a
priority, requeued tasks at the front; tasks that were on 2+ dying workers
("suspects") wait apart so the scheduler can run them one per worker; retries
wait in a heap until their back-off ends. Removal is lazy: a task that leaves
the queue early (cancelled, finished late) is skipped when popped, and
`discard` keeps the counts right.
"""

from __future__ import annotations

import heapq
from collections import deque

from .records import DELAYED, QUEUED, SUSPECT, Task, WorkerRecord
from .routing import Route


class TaskQueue:
    def __init__(self, tasks: dict[int, Task]) -> None:
        self._tasks = tasks  # the scheduler's index: a popped task not in it is stale
        self._queues: dict[int, deque[Task]] = {}
        self._levels: list[int] = []  # a heap of negated priorities: a level is here iff it has a deque
        self.n_ready = 0
        self._suspects: deque[Task] = deque()
        self.n_suspects = 0
        self._delayed: list[tuple[float, int, Task]] = []

    def __len__(self) -> int:
        return self.n_ready + self.n_suspects

    @property
    def n_delayed(self) -> int:
        return len(self._delayed)

    def push(self, task: Task, front: bool = False) -> None:
        task.state = QUEUED
        task.worker = None
        queue = self._queues.get(task.priority)
        if queue is None:
            queue = self._queues[task.priority] = deque()
            heapq.heappush(self._levels, -task.priority)
        if front:
            queue.appendleft(task)
        else:
            queue.append(task)
        self.n_ready += 1

    def pop(self, n: int) -> list[Task]:
        out: list[Task] = []
        tasks = self._tasks
        while len(out) < n and self._levels:
            queue = self._queues[-self._levels[0]]
            while queue and len(out) < n:
                task = queue.popleft()
                if task.state == QUEUED and tasks.get(task.id) is task:
                    out.append(task)
            if not queue:
                del self._queues[-heapq.heappop(self._levels)]
        self.n_ready -= len(out)
        return out

    def push_suspect(self, task: Task) -> None:
        task.state = SUSPECT
        task.worker = None
        self._suspects.append(task)
        self.n_suspects += 1

    def pop_suspect(self) -> Task | None:
        while self._suspects:
            task = self._suspects.popleft()
            if task.state == SUSPECT and self._tasks.get(task.id) is task:
                self.n_suspects -= 1
                return task
        return None

    def delay(self, task: Task, until: float) -> None:
        task.state = DELAYED
        task.worker = None
        heapq.heappush(self._delayed, (until, task.id, task))

    def due(self, now: float) -> list[Task]:
        """Delayed tasks whose back-off has ended."""
        out = []
        while self._delayed and self._delayed[0][0] <= now:
            task = heapq.heappop(self._delayed)[2]
            if task.state == DELAYED and self._tasks.get(task.id) is task:
                out.append(task)
        return out

    def discard(self, task: Task) -> None:
        """A waiting task leaves early (it is skipped when popped); keep the counts right."""
        if task.state == QUEUED:
            self.n_ready -= 1
        elif task.state == SUSPECT:
            self.n_suspects -= 1


class RoutedQueue:
    """The tasks held for one route (tags and resources): their own queue, and the workers that could take
    them (``eligible_set`` the live ones; ``eligible`` in joining order, departed ones dropped lazily)."""

    __slots__ = ("route", "queue", "held", "eligible", "eligible_set", "turn", "blocked")

    def __init__(self, route: Route, tasks: dict[int, Task]) -> None:
        self.route = route
        self.queue = TaskQueue(tasks)
        self.held = 0  # tasks held with this route, in any state: the record goes when none is left
        self.eligible: list[WorkerRecord] = []
        self.eligible_set: set[WorkerRecord] = set()
        self.turn = 0  # which eligible worker a dispatch starts at, so equal workers take turns
        self.blocked = False
        """Tasks wait and no eligible worker had room for one at the last dispatch: until one gains room
        (slots or resources), only the workers that did need a look."""
