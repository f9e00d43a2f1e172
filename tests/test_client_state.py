"""ClientState driven by long random sequences of events (hypothesis stateful), as the scheduler would send
them and worse: duplicate results, results for unknown ids, CANCELLED results nobody asked for, new epochs.

After every step `validate()` checks the state machine's invariants, and the model checks what the client
promises its caller: every handle resolves exactly once, nothing is sent (nor resent) for a cancelled task,
a CANCEL names only tasks the scheduler got, a resubmission never grows the window, and a task is submitted
again after an audit only when it was missing in two rounds in a row. 100 runs of 100 steps: 10,000 events.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from zfabric.client_state import ClientState, SayHello, SendAudit, SendCancel, SendSubmit
from zfabric.config import ClientConfig
from zfabric.errors import FabricUnreachable, TaskCancelled, TaskError, TaskRejected
from zfabric.handle import DONE, SENT, WAITING, Handle
from zfabric.protocol import MAX_BATCH_TASKS, Status, encode_error, encode_value

STEPS = {"count": 0}


class CountingHandle(Handle):
    """A handle that counts how often it was finished (a second `_finish` would go unseen otherwise)."""

    __slots__ = ("finishes",)

    def __init__(self, task_id: int, client: Any, payload: bytes, priority: int) -> None:
        super().__init__(task_id, client, payload, priority)
        self.finishes = 0

    def _finish(self, value: Any, error: BaseException | None) -> None:
        self.finishes += 1
        super()._finish(value, error)


class Owner:
    """What a handle needs of its client: a loop (never used here) and `_cancel`."""

    _loop: asyncio.AbstractEventLoop

    def __init__(self, state: ClientState) -> None:
        self.state = state
        self.cancel_pending = False

    def _cancel(self, handle: Handle) -> None:
        if self.state.cancel(handle):
            self.cancel_pending = True


class ClientMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.next_id = 1 << 40
        self.handles: list[CountingHandle] = []
        self.by_id: dict[int, CountingHandle] = {}
        self.cancelled: set[int] = set()        # ids the caller cancelled
        self.sent_ever: set[int] = set()        # ids some SUBMIT frame carried (the scheduler got them)
        self.cancels_sent: set[int] = set()
        self.epochs = 100
        self.model_prev: set[int] = set()       # the model's view of the audit rounds
        self.model_now: set[int] = set()
        self.hellos = 0

    @initialize(window=st.integers(1, 8), fire_and_forget=st.sampled_from([False, False, False, True]))
    def setup(self, window: int, fire_and_forget: bool) -> None:
        self.config = ClientConfig(window=window, results_to="tcp://127.0.0.1:9" if fire_and_forget else "")
        self.s = ClientState(self.config)
        self.owner = Owner(self.s)
        self.ff = fire_and_forget

    # ---- helpers ----------------------------------------------------------------------------

    def _step(self) -> None:
        STEPS["count"] += 1

    def _collect(self) -> list[int]:
        """Carry out the commands as the driver would; returns the ids submitted, in order."""
        submitted: list[int] = []
        for command in self.s.take():
            if isinstance(command, SendSubmit):
                flat = command.flat
                assert len(flat) % 3 == 0 and 0 < len(flat) <= 3 * MAX_BATCH_TASKS
                for i in range(0, len(flat), 3):
                    task_id = flat[i]
                    assert task_id not in self.cancelled, f"{task_id:#x} submitted after the caller cancelled it"
                    handle = self.by_id[task_id]
                    assert handle.state == SENT and self.s.handles.get(task_id) is handle, "submitted a finished task"
                    assert flat[i + 1] == handle.placement and flat[i + 2] == handle.payload
                    submitted.append(task_id)
                    self.sent_ever.add(task_id)
            elif isinstance(command, SendCancel):
                for task_id in command.ids:
                    assert task_id in self.cancelled, f"CANCEL for {task_id:#x}, which nobody cancelled"
                    assert task_id in self.sent_ever, f"CANCEL for {task_id:#x}, which the scheduler never got"
                    assert task_id not in self.cancels_sent, f"CANCEL for {task_id:#x} twice"
                    self.cancels_sent.add(task_id)
            elif isinstance(command, SendAudit):
                raise AssertionError("an AUDIT outside an audit round")
            elif isinstance(command, SayHello):
                self.hellos += 1
        return submitted

    def _live(self, state: int | None = None) -> list[CountingHandle]:
        return [h for h in self.s.handles.values() if state is None or h.state == state]

    def _new_handle(self, priority: int) -> CountingHandle:
        self.next_id += 1
        handle = CountingHandle(self.next_id, self.owner, b"call-%d" % self.next_id, priority)
        self.handles.append(handle)
        self.by_id[handle.id] = handle
        return handle

    def _pump(self) -> list[int]:
        """What the driver does on its next turn: send cancels and what the window has room for."""
        before = self.s.in_scheduler
        waiting = [h.id for h in self.s.outbox if h.state == WAITING]
        self.s.send_waiting()
        self.owner.cancel_pending = False
        sent = self._collect()
        if self.s.welcomed:
            room = self.config.window - before
            assert sent == waiting[:max(room, 0)], "the window was not filled in submission order"
        else:
            assert not sent, "tasks sent to a scheduler that has not welcomed us"
        return sent

    # ---- the caller -------------------------------------------------------------------------

    @rule(n=st.integers(1, 8), priority=st.integers(-1, 1), pump=st.booleans())
    def submit(self, n: int, priority: int, pump: bool) -> None:
        for _ in range(n):
            handle = self._new_handle(priority)
            size = self.s.submit(handle)
            assert handle.state == WAITING and self.s.outbox[-1] is handle and size == len(self.s.outbox)
        if pump:
            self._pump()
        self._step()

    @rule(pump=st.booleans())
    def submit_then_cancel(self, pump: bool) -> None:
        """The caller cancels right after submitting: nothing about the task may reach the scheduler."""
        handle = self._new_handle(0)
        self.s.submit(handle)
        self.owner.cancel_pending = False
        assert handle.cancel()
        self.cancelled.add(handle.id)
        assert handle.cancelled() and not self.owner.cancel_pending
        if pump:
            self._pump()
        self._step()

    @precondition(lambda self: bool(self.s.handles))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self._live()))
        was_sent = handle.state == SENT
        before = self.s.in_scheduler
        self.owner.cancel_pending = False
        assert handle.cancel()
        self.cancelled.add(handle.id)
        assert self.owner.cancel_pending == was_sent
        assert self.s.in_scheduler == before - was_sent
        assert not handle.cancel(), "cancelled twice"
        self._step()

    @rule()
    def pump(self) -> None:
        self._pump()
        self._step()

    @rule()
    def fail_all(self) -> None:
        live = self._live()
        self.s.fail_all(FabricUnreachable("gone"))
        assert not self.s.handles and self.s.in_scheduler == 0 and not self.s.outbox
        assert all(isinstance(h.exception(), FabricUnreachable) for h in live)
        self._collect()
        self._step()

    # ---- the scheduler ----------------------------------------------------------------------

    @rule(data=st.data(), entries=st.lists(st.sampled_from(["ok", "error", "garbage", "duplicate", "unknown",
                                                            "not-an-id", "unasked-cancel"]), min_size=1, max_size=6))
    def results(self, data: st.DataObject, entries: list[str]) -> None:
        """One RESULT batch, honest entries mixed with duplicates, strangers and unasked cancellations."""
        flat: list[Any] = []
        resolved: list[CountingHandle] = []
        unasked: list[int] = []
        strays = 0
        used: set[int] = set()
        for what in entries:
            sent = [h for h in self._live(SENT) if h.id not in used]
            finished = [h for h in self.handles if h.state == DONE]
            if what in ("ok", "error", "garbage") and sent:
                handle = data.draw(st.sampled_from(sent))
                used.add(handle.id)
                resolved.append(handle)
                if what == "ok":
                    flat += (handle.id, int(Status.OK), encode_value(handle.id))
                elif what == "error":
                    flat += (handle.id, int(Status.ERROR), encode_error("ValueError", "bad"))
                else:
                    flat += (handle.id, int(Status.OK), "not bytes")
            elif what == "unasked-cancel" and sent:
                handle = data.draw(st.sampled_from(sent))
                used.add(handle.id)
                unasked.append(handle.id)
                flat += (handle.id, int(Status.CANCELLED), b"")
            elif what == "duplicate" and finished:
                handle = data.draw(st.sampled_from(finished))
                status = data.draw(st.sampled_from([int(Status.OK), int(Status.CANCELLED)]))
                flat += (handle.id, status, encode_value(0))
                strays += 1
            elif what == "not-an-id":
                flat += ("x", int(Status.OK), b"")
                strays += 1
            else:
                flat += (self.next_id + 1000, int(Status.OK), encode_value(0))  # never a handle
                strays += 1
        before = (self.s.in_scheduler, self.s.duplicates, self.s.unasked_cancels)
        self.s.results(flat)
        self._collect()
        assert self.s.in_scheduler == before[0] - len(resolved)
        assert self.s.duplicates == before[1] + strays
        assert self.s.unasked_cancels == before[2] + len(unasked)
        for handle in resolved:
            assert handle.done() and handle.id not in self.s.handles
            if isinstance(handle._value, int):
                assert handle.result() == handle.id
            else:
                assert isinstance(handle.exception(), TaskError)
        for task_id in unasked:
            handle = self.by_id[task_id]
            assert handle.state == SENT and task_id in self.s.missing_now, "an unasked CANCELLED lost the task"
            assert not isinstance(handle._error, TaskCancelled)
            self.model_now.add(task_id)
        self._step()

    @rule(new=st.booleans())
    def welcome(self, new: bool) -> None:
        """A WELCOME (first contact, a restarted scheduler, or one that forgot us): every SENT task again."""
        if new or self.s.epoch is None:
            self.epochs += 1
        sent = {h.id for h in self._live(SENT)}
        before = self.s.in_scheduler
        self.s.welcome(self.epochs)
        again = self._collect()
        assert sorted(again) == sorted(sent) and len(again) == len(set(again)), "WELCOME resubmitted the wrong tasks"
        assert self.s.welcomed and self.s.epoch == self.epochs
        assert self.s.in_scheduler == before, "a resubmission changed the window"
        self._step()

    @rule(ours=st.booleans(), accepted=st.booleans(), data=st.data())
    def heartbeat_or_accepted(self, ours: bool, accepted: bool, data: st.DataObject) -> None:
        epoch = self.s.epoch if ours else self.epochs + 7
        hellos = self.hellos
        sent = self._live(SENT)
        if accepted:
            ids = [h.id for h in data.draw(st.lists(st.sampled_from(sent), max_size=4, unique=True))] if sent else []
            self.s.accepted(epoch, ids + [self.next_id + 1000, "x"])
            for task_id in ids:
                handle = self.by_id[task_id]
                if self.ff:
                    assert handle.done() and handle.result() is None and task_id not in self.s.handles
                else:
                    assert handle.state == SENT
        else:
            self.s.heard(epoch)
        self._collect()
        if self.s.epoch is not None:
            assert self.hellos == hellos + (not ours), "a new epoch was not greeted (or ours was)"
            if ours:
                assert self.s.welcomed
        self._step()

    @rule(data=st.data())
    def rejected(self, data: st.DataObject) -> None:
        sent = self._live(SENT)
        picked = data.draw(st.lists(st.sampled_from(sent), max_size=4, unique=True)) if sent else []
        flat: list[Any] = []
        for handle in picked:
            flat += (handle.id, "queue full")
        flat += (self.next_id + 1000, "stranger", "x", "not an id")
        before = self.s.in_scheduler
        self.s.rejected(flat)
        self._collect()
        assert self.s.in_scheduler == before - len(picked)
        for handle in picked:
            assert isinstance(handle.exception(), TaskRejected) and handle.id not in self.s.handles
        self._step()

    @rule()
    def scheduler_silent(self) -> None:
        self.s.lost_contact()
        assert not self.s.welcomed
        self._step()

    @rule(chunk=st.integers(1, 4), data=st.data())
    def audit_round(self, chunk: int, data: st.DataObject) -> None:
        """An audit round: AUDIT in chunks, then MISSING replies in several chunks (some ids strangers)."""
        sent = {h.id for h in self._live(SENT)}
        self.s.audit_due(chunk)
        commands = self.s.take()
        if self.ff:
            assert not commands, "a fire-and-forget client audits (it holds no results to lose)"
            self._step()
            return
        audited: list[int] = []
        for command in commands:
            assert isinstance(command, SendAudit) and 0 < len(command.ids) <= chunk
            audited += command.ids
        assert sorted(audited) == sorted(sent), "the audit round asked about other tasks than the SENT ones"
        self.model_prev, self.model_now = self.model_now, set()
        missing = data.draw(st.lists(st.sampled_from(audited), unique=True)) if audited else []
        missing += data.draw(st.lists(st.sampled_from([self.next_id + 1000, "x"]), max_size=2))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(missing)), max_size=3)))
        pieces = [missing[a:b] for a, b in zip([0] + cuts, cuts + [len(missing)])]
        for piece in pieces:
            expected = []
            for task_id in piece:
                handle = self.s.handles.get(task_id) if type(task_id) is int else None
                if handle is None or handle.state != SENT:
                    continue
                if task_id in self.model_prev:
                    self.model_prev.discard(task_id)
                    expected.append(task_id)
                else:
                    self.model_now.add(task_id)
            before = (self.s.in_scheduler, self.s.resubmitted)
            self.s.missing(piece)
            again = self._collect()
            assert again == expected, f"resubmitted {again}, expected those missing twice in a row: {expected}"
            assert self.s.resubmitted == before[1] + len(expected)
            assert self.s.in_scheduler == before[0], "a resubmission changed the window"
        self._step()

    # ---- checks -----------------------------------------------------------------------------

    @invariant()
    def valid(self) -> None:
        if not hasattr(self, "s"):
            return
        self.s.validate()
        table = self.s.handles
        for handle in self.handles:
            assert handle.finishes <= 1, f"handle {handle.id:#x} resolved {handle.finishes} times"
            assert (handle.state == DONE) == (handle.finishes == 1)
            assert (table.get(handle.id) is handle) == (handle.state != DONE)
            if handle.id in self.cancelled:
                assert handle.state == DONE

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        self.s.fail_all(FabricUnreachable("closed"))
        self._collect()
        self.s.validate()
        assert all(h.finishes == 1 for h in self.handles), "a handle never resolved, or twice"


TestClientState = ClientMachine.TestCase
# No shrinking in CI: a failure prints its (long) sequence at once instead of minutes later.
TestClientState.settings = settings(max_examples=100, stateful_step_count=100, deadline=None,
                                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
