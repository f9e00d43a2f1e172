"""The client's bookkeeping as a pure state machine (layer 4: imports config, errors, handle, protocol).

The rule it keeps: the client is the durable copy of its tasks, and every
decision about them is made here, with no sockets, no clock and no event
loop. Events go in as method calls (a handle submitted or cancelled, a
RESULT batch, WELCOME, ACCEPTED/HEARTBEAT, REJECTED, MISSING, an audit
round due, fail everything); what must be sent comes out as typed commands
appended to `commands`, which `Client` (the asyncio driver) encodes and
sends. Handles are resolved here (`Handle._resolve` / `_finish`).

The hot path does no more per task than the socket callbacks did: one
table entry and one outbox entry per submitted task, and one command per
frame, never per task.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from .config import ClientConfig
from .errors import TaskRejected
from .handle import DONE, SENT, WAITING, Handle
from .protocol import (MAX_BATCH_BYTES, MAX_BATCH_TASKS, MAX_FRAME_BYTES, PAYLOAD_FRAME_BYTES, Status, attach,
                       payload_of)

log = logging.getLogger("zfabric.client")

ENVELOPE_HEADROOM = 64 * 1024
MAX_CALL_BYTES = MAX_FRAME_BYTES - ENVELOPE_HEADROOM
"""Largest encoded call one task may have, and most payload bytes one SUBMIT frame carries: a frame over
`MAX_FRAME_BYTES` would drop the connection, and every task in flight on it."""
_CANCELLED = int(Status.CANCELLED)


# ---- commands: what the driver sends ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendSubmit:
    """A SUBMIT: ``flat`` is ``[id, placement, payload, ...]`` (`routing.placement`) within the frame and batch limits; a large
    payload is named by its number in ``frames`` (`protocol.attach`)."""
    flat: list[Any]
    frames: list[Any]


@dataclass(frozen=True, slots=True)
class SendCancel:
    """A CANCEL frame for these task ids (tasks the scheduler holds that the caller cancelled)."""
    ids: list[int]


@dataclass(frozen=True, slots=True)
class SendAudit:
    """An AUDIT frame: which of these ids does the scheduler no longer hold? (one chunk of a round)"""
    ids: list[int]


@dataclass(frozen=True, slots=True)
class SayHello:
    """A CLIENT_HELLO: a scheduler of another epoch spoke to us; it will WELCOME us."""


Command = SendSubmit | SendCancel | SendAudit | SayHello


class ClientState:
    """Handles table, outbox, window, pending cancels, epoch and audit rounds of one client.

    A handle is WAITING (in the table and in `outbox`), SENT (in the table, counted in `in_scheduler`)
    or DONE (resolved exactly once, and gone from the table). See `validate()` for the invariants.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.handles: dict[int, Handle] = {}
        self.outbox: deque[Handle] = deque()
        """WAITING handles in submission order; may also hold DONE ones (cancelled while waiting), which
        `send_waiting` skips."""
        self.cancels: list[int] = []
        self.in_scheduler = 0
        self.epoch: int | None = None
        self.welcomed = False
        self.missing_prev: set[int] = set()  # missing in the previous audit round
        self.missing_now: set[int] = set()  # missing so far in this round (its replies accumulate)
        self.commands: list[Command] = []
        self.resubmitted = 0
        self.duplicates = 0
        self.unasked_cancels = 0

    def take(self) -> list[Command]:
        """The commands to carry out, in order (and forget them here)."""
        commands, self.commands = self.commands, []
        return commands

    # ---- events from the caller -------------------------------------------------------------

    def submit(self, handle: Handle) -> int:
        """A new WAITING handle; returns how many handles the outbox holds now."""
        self.handles[handle.id] = handle
        outbox = self.outbox
        outbox.append(handle)
        return len(outbox)

    def has_room(self) -> bool:
        return self.in_scheduler < self.config.window

    def cancel(self, handle: Handle) -> bool:
        """The caller cancels `handle` (which then finishes itself). True if a CANCEL is now pending (the
        scheduler holds the task); a WAITING handle is skipped in the outbox and never sent."""
        if self.handles.pop(handle.id, None) is handle and handle.state == SENT:
            self.in_scheduler -= 1
            self.cancels.append(handle.id)
            return True
        return False

    def send_waiting(self) -> None:
        """Send pending cancellations, and waiting tasks while the window has room, many per frame."""
        if self.cancels:
            cancels, self.cancels = self.cancels, []
            self.commands.append(SendCancel(cancels))
        if not self.welcomed:
            return
        room = self.config.window - self.in_scheduler
        outbox = self.outbox
        while room > 0 and outbox:
            flat: list[Any] = []
            frames: list[Any] = []
            size = 0
            while room > 0 and outbox and size < MAX_BATCH_BYTES and len(flat) < 3 * MAX_BATCH_TASKS:
                handle = outbox[0]
                if handle.state != WAITING:
                    outbox.popleft()
                    continue  # cancelled (or resolved) while waiting
                n = len(handle.payload)  # type: ignore[arg-type]
                if flat and size + n > MAX_CALL_BYTES:
                    break  # it goes first in the next frame: no frame passes the frame limit
                outbox.popleft()
                handle.state = SENT
                payload = handle.payload
                flat += (handle.id, handle.placement, payload if n < PAYLOAD_FRAME_BYTES else attach(payload, frames))
                size += n
                room -= 1
            if flat:
                self.in_scheduler += len(flat) // 3
                self.commands.append(SendSubmit(flat, frames))

    def fail_all(self, error: BaseException) -> None:
        """Every unfinished task fails with `error` (the client stops, or the scheduler stayed silent)."""
        handles, self.handles = self.handles, {}
        self.outbox.clear()
        self.in_scheduler = 0
        for handle in handles.values():
            if handle.state != DONE:
                handle._finish(None, error)

    # ---- events from the scheduler ----------------------------------------------------------

    def results(self, flat: list[Any], frames: tuple[Any, ...] = ()) -> None:
        """A RESULT batch ``[id, status, data, ...]`` (with its payload frames): each unfinished handle
        named is resolved once."""
        handles = self.handles
        accept_pickle = self.config.serializer == "pickle"  # results of pickled calls come back pickled
        used: set[int] = set()
        for i in range(0, len(flat) - 2, 3):
            status = flat[i + 1]
            if status == _CANCELLED and type(status) is int:
                self._on_cancelled(flat[i])
                continue
            handle = handles.pop(flat[i], None) if type(flat[i]) is int else None
            if handle is None:
                self.duplicates += 1
                continue
            if handle.state == SENT:
                self.in_scheduler -= 1
            data = flat[i + 2]
            if type(data) is not bytes:
                data = payload_of(data, frames, used)
            if type(status) is not int or data is None:
                data, status = b"", -1
            handle._resolve(status, data, accept_pickle)

    def _on_cancelled(self, task_id: Any) -> None:
        """A CANCELLED result. A handle the caller cancelled is resolved and forgotten at once, so one still
        pending was cancelled by nobody here: the scheduler forgot us (our loop stalled past its client
        timeout, say). The task must run again: the handle stays SENT, so the WELCOME the scheduler sends
        when we say hello again resubmits it; and should no WELCOME come, the next audit round that finds
        it missing does."""
        handle = self.handles.get(task_id) if type(task_id) is int else None
        if handle is None or handle.state != SENT:
            self.duplicates += 1
            return
        self.unasked_cancels += 1
        self.missing_now.add(task_id)

    def heard(self, epoch: Any) -> None:
        """A HEARTBEAT (or ACCEPTED) of scheduler `epoch`: ours, or a new one we must say hello to."""
        if self.epoch is not None:
            if epoch == self.epoch:
                self.welcomed = True
            else:
                self.commands.append(SayHello())  # a new scheduler: it will WELCOME us

    def accepted(self, epoch: Any, ids: list[Any]) -> None:
        if self.config.results_to:
            self._fire_and_forget(ids)
        self.heard(epoch)

    def _fire_and_forget(self, ids: list[Any]) -> None:
        """With `results_to` set, results go to another sink: a task is done here once accepted."""
        handles = self.handles
        for task_id in ids:
            handle = handles.get(task_id) if type(task_id) is int else None
            if handle is not None and handle.state == SENT:
                del handles[task_id]
                self.in_scheduler -= 1
                handle._finish(None, None)

    def welcome(self, epoch: int) -> None:
        """The scheduler (re)admits us: every task sent and not finished is sent again, same ids."""
        if self.epoch is not None and epoch != self.epoch:
            log.warning("client: scheduler restarted (epoch %x -> %x)", self.epoch, epoch)
        self.epoch = epoch
        sent = [h for h in self.handles.values() if h.state == SENT]
        if sent:
            log.info("client: resubmitting %d unfinished tasks to scheduler epoch %x", len(sent), epoch or 0)
        self._resubmit(sent)
        self.welcomed = True

    def rejected(self, flat: list[Any]) -> None:
        """A REJECTED ``[id, reason, ...]``: those handles fail with TaskRejected."""
        handles = self.handles
        for i in range(0, len(flat) - 1, 2):
            handle = handles.pop(flat[i], None) if type(flat[i]) is int else None
            if handle is not None:
                if handle.state == SENT:
                    self.in_scheduler -= 1
                handle._finish(None, TaskRejected("Rejected", str(flat[i + 1]), "", handle.id))

    def lost_contact(self) -> None:
        """The scheduler has been silent too long: send nothing new until it speaks again."""
        self.welcomed = False

    # ---- audit ------------------------------------------------------------------------------

    def audit_due(self, chunk: int) -> None:
        """Start an audit round: ask which SENT tasks the scheduler no longer holds, `chunk` ids per frame."""
        if self.config.results_to:
            return
        self.missing_prev, self.missing_now = self.missing_now, set()  # a new round
        sent = [task_id for task_id, h in self.handles.items() if h.state == SENT]
        for i in range(0, len(sent), chunk):
            self.commands.append(SendAudit(sent[i:i + chunk]))

    def missing(self, ids: list[Any]) -> None:
        """A task the scheduler no longer holds finished, but its result may be lost (a worker died with it
        buffered, or dropped it while we were not reading). Missing in two audit rounds in a row: submit it
        again. A round may take several AUDIT frames: the replies within one round accumulate."""
        again: list[Handle] = []
        prev, now = self.missing_prev, self.missing_now
        handles = self.handles
        for task_id in ids:
            handle = handles.get(task_id) if type(task_id) is int else None
            if handle is None or handle.state != SENT:
                continue
            if task_id in prev:
                prev.discard(task_id)
                again.append(handle)
            else:
                now.add(task_id)
        if again:
            log.warning("client: %d finished tasks never delivered their result; submitting them again", len(again))
            self._resubmit(again)

    def _resubmit(self, handles: list[Handle]) -> None:
        """Send SENT `handles` again, batched like `send_waiting` (by count and size, never past the frame
        limit). They stay counted in `in_scheduler` once: a resubmission never grows the window."""
        self.resubmitted += len(handles)
        flat: list[Any] = []
        frames: list[Any] = []
        size = 0
        for handle in handles:
            n = len(handle.payload)  # type: ignore[arg-type]
            if flat and (len(flat) >= 3 * MAX_BATCH_TASKS or size >= MAX_BATCH_BYTES or size + n > MAX_CALL_BYTES):
                self.commands.append(SendSubmit(flat, frames))
                flat, frames, size = [], [], 0
            flat += (handle.id, handle.placement, attach(handle.payload, frames))
            size += n
        if flat:
            self.commands.append(SendSubmit(flat, frames))

    # ---- invariants -------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every invariant; raise AssertionError naming the first broken one (tests call it after
        every event). O(tasks): for tests, never on the hot path."""
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise AssertionError(what)
        n_sent = 0
        for task_id, handle in self.handles.items():
            check(handle.id == task_id, f"handle {task_id:#x} indexed under another id")
            check(handle.state in (WAITING, SENT), f"handle {task_id:#x} in the table is in state {handle.state}")
            check(handle.payload is not None, f"unfinished handle {task_id:#x} lost its encoded call")
            n_sent += handle.state == SENT
        check(self.in_scheduler == n_sent, f"in_scheduler is {self.in_scheduler}, {n_sent} handles are SENT")
        # Resubmissions (WELCOME, MISSING) re-send handles already counted, so they never push past the window;
        # only a window shrunk while tasks were in the scheduler could (the driver never shrinks it).
        check(0 <= self.in_scheduler <= self.config.window,
              f"in_scheduler {self.in_scheduler} outside 0..{self.config.window}")
        in_outbox: set[int] = set()
        for handle in self.outbox:
            check(id(handle) not in in_outbox, f"handle {handle.id:#x} twice in the outbox")
            in_outbox.add(id(handle))
            check(handle.state == DONE or (handle.state == WAITING and self.handles.get(handle.id) is handle),
                  f"outbox holds handle {handle.id:#x} in state {handle.state}")
        for handle in self.handles.values():
            check(handle.state != WAITING or id(handle) in in_outbox, f"waiting handle {handle.id:#x} not in outbox")
        for task_id in self.cancels:
            check(task_id not in self.handles, f"cancel pending for {task_id:#x}, still in the table")
        # The missing sets are not pruned when a result arrives (that would cost per task): an id in them is
        # either gone from the table or names a SENT handle (states never go back, MISSING only marks SENT ones).
        for name, ids in (("previous", self.missing_prev), ("current", self.missing_now)):
            for task_id in ids:
                held = self.handles.get(task_id)
                check(held is None or held.state == SENT,
                      f"{name} audit round holds {task_id:#x}, a handle that is not SENT")
        check(not self.welcomed or self.epoch is not None, "welcomed without an epoch")
