"""The fabric's event stream: what the scheduler records, how it travels, and what a follower prints
(layer 2: imports protocol).

The rule it keeps: recording costs the scheduler one small tuple per batch of tasks, never one per task,
and only while someone follows (`SchedulerState.events` is None otherwise). The driver publishes the
records on an XPUB socket as EVENTS messages, numbered by record, without ever blocking: a follower that
falls behind loses messages in libzmq and learns how many records it missed from the numbering. A
follower finds the stream by asking the scheduler's intake for its status (the ``events`` address), so
one address still names the whole fabric.

A record is ``(kind, who, data)``: ``who`` a worker's name or a client's sink, ``data`` a list of task ids,
flat ``[id, type, message, ...]`` for failures, or a detail for worker events. `expand` makes the JSON
objects `zfabric events` prints, one per task and event.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from .protocol import Events, encode

SUBMITTED, DISPATCHED, DONE, FAILED, CANCELLED = "submitted", "dispatched", "done", "failed", "cancelled"
REDELIVERED, RETRIED = "redelivered", "retried"
WORKER_JOINED, WORKER_LOST, WORKER_DRAINING, WORKER_LEFT = "worker-joined", "worker-lost", "worker-draining", "worker-left"
LOST_EVENTS = "lost"
"""Not a fabric event: the follower's note that it missed ``count`` records (it fell behind)."""

TASK_EVENTS = frozenset({SUBMITTED, DISPATCHED, DONE, CANCELLED, REDELIVERED, RETRIED})
WORKER_EVENTS = frozenset({WORKER_JOINED, WORKER_LOST, WORKER_DRAINING, WORKER_LEFT})
MAX_RECORDS = 1000
"""Records per EVENTS message (each costs two of an envelope's 10,000 containers)."""
MAX_IDS = 30_000
"""Ids (or failure triples' items) per record on the wire: a longer record is split."""
MAX_MESSAGE_BYTES = 1024 * 1024
"""A message is closed once its records (counted roughly) pass this size."""

Record = tuple[str, str, Any]


def count_events(record: Any) -> int:
    """How many events (lines of `zfabric events`) a record holds: the numbering counts these."""
    kind, data = record[0], record[2]
    if kind == FAILED:
        return len(data) // 3
    return len(data) if kind in TASK_EVENTS else 1


def messages(first_seq: int, now: float, records: list[Record]) -> Iterator[bytes]:
    """EVENTS messages carrying ``records`` (long id lists split; at most `MAX_RECORDS` records and about
    `MAX_MESSAGE_BYTES` a message), numbered by event from ``first_seq``."""
    step = MAX_IDS - MAX_IDS % 3
    chunk: list[Any] = []
    size = events = 0
    for kind, who, data in records:
        parts = ([data[i:i + step] for i in range(0, len(data), step)]
                 if type(data) is list and len(data) > MAX_IDS else [data])
        for part in parts:
            record = [kind, who, part]
            chunk.append(record)
            events += count_events(record)
            size += len(who) + 16 + (sum(10 if type(x) is int else len(x) + 2 for x in part)
                                     if type(part) is list else len(str(part)))
            if len(chunk) >= MAX_RECORDS or size >= MAX_MESSAGE_BYTES:
                yield encode(Events(first_seq, now, chunk))
                first_seq += events
                chunk, size, events = [], 0, 0
    if chunk:
        yield encode(Events(first_seq, now, chunk))


def count_all(records: list[Record]) -> int:
    """How many numbers `messages` uses for ``records``."""
    return sum(count_events(record) for record in records)


class Follower:
    """Turns EVENTS messages into JSON-ready objects, noting records missed between messages."""

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.lost = 0
        self.malformed = 0

    def restart(self) -> None:
        """The scheduler restarted: its numbering starts again."""
        self.next_seq = None

    def feed(self, message: Events) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        t = float(message.time)
        if not math.isfinite(t):
            self.malformed += 1
            return out
        if self.next_seq is not None and message.first_seq < self.next_seq:
            self.restart()  # numbered lower (a SUB never sees its messages reordered): the scheduler restarted
        if self.next_seq is not None and message.first_seq > self.next_seq:
            missed = message.first_seq - self.next_seq
            self.lost += missed
            out.append({"event": LOST_EVENTS, "t": t, "count": missed})
        n = 0
        for record in message.events:
            expanded = expand(record, t)
            if expanded is None:
                self.malformed += 1
            else:
                out += expanded
                n += count_events(record)
        self.next_seq = message.first_seq + n
        return out


def expand(record: Any, t: float) -> list[dict[str, Any]] | None:
    """One record as the objects `zfabric events` prints; None if it is malformed."""
    if type(record) is not list or len(record) != 3 or type(record[0]) is not str or type(record[1]) is not str:
        return None
    kind, who, data = record
    if kind in TASK_EVENTS:
        if type(data) is not list:
            return None
        key = "client" if kind == SUBMITTED else "worker"
        base = {"event": kind, "t": t} if kind == CANCELLED else {"event": kind, "t": t, key: who}
        return [{**base, "task": task} for task in data if type(task) is int]
    if kind == FAILED:
        if type(data) is not list:
            return None
        return [{"event": FAILED, "t": t, "task": data[i], "worker": who,
                 "error": {"type": data[i + 1], "message": data[i + 2]}}
                for i in range(0, len(data) - 2, 3)
                if type(data[i]) is int and type(data[i + 1]) is str and type(data[i + 2]) is str]
    if kind in WORKER_EVENTS:
        event: dict[str, Any] = {"event": kind, "t": t, "worker": who}
        if kind == WORKER_JOINED and type(data) is list and len(data) == 2 and type(data[0]) is str \
                and type(data[1]) is int:
            event["host"], event["pid"] = data
        elif kind == WORKER_LOST and type(data) is str:
            event["why"] = data
        elif kind == WORKER_DRAINING and type(data) is int:
            event["handed_back"] = data
        return [event]
    return None
