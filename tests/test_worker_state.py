"""WorkerState, the worker's pure state machine, driven by long random sequences of events.

A model scheduler (honest, unless a rule says otherwise) and a model driver run beside the machine. After
every step: `validate()`, the scheduler's count of free slots equals the worker's, and every task the
machine started is in exactly one place (running, waiting in the next DONE, or reported once).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zfabric.worker_state import (Interrupt, Malformed, SendBye, SendDone, SendDrain, SendHello, Start,
                                  WorkerState)

pytestmark = pytest.mark.timeout(300)

CONCURRENCY = 8
HEARTBEAT_S = 1.0
TIMEOUT_S = 5.0


class WorkerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.state = WorkerState(CONCURRENCY, HEARTBEAT_S, TIMEOUT_S, "w")
        self.next_id = 1
        self.live: dict[int, int] = {}  # task id -> run, as the driver runs them
        self.old_runs: list[tuple[int, int]] = []  # runs that ended: their outcomes must change nothing
        self.outstanding: set[int] = set()  # started and not yet reported to the scheduler
        self.reported: list[int] = []
        self.bounced: set[int] = set()  # dispatched while draining: handed straight back, never started
        self.interrupts: list[Interrupt] = []
        # the scheduler's view of the current session
        self.session = 0
        self.seq = 0
        self.sched_free = 0
        self.honest = True
        self.byes = 0
        self.state.hello(self.now)
        self.carry_out()

    # ---- the model driver and scheduler --------------------------------------------------

    def carry_out(self) -> None:
        for command in self.state.take():
            if type(command) is SendHello:
                self.session, self.seq = command.session, 0
                self.sched_free = command.free
                assert set(command.running) == set(self.state.running)
                assert len(command.running) + command.free <= CONCURRENCY or not self.honest
            elif type(command) is SendDone:
                assert len(set(command.finished)) == len(command.finished)
                self.report(command.finished + command.retries[0::2])
                if command.session == self.session:
                    self.sched_free += command.credit
            elif type(command) is SendDrain:
                assert not set(command.handed_back) & set(self.state.running), "handed back a task still running"
                self.report(command.handed_back)
            elif type(command) is Interrupt:
                self.interrupts.append(command)
            elif type(command) is SendBye:
                self.byes += 1
            else:
                assert type(command) is Malformed

    def report(self, ids: list[int]) -> None:
        for task_id in ids:
            if task_id in self.bounced:
                self.bounced.discard(task_id)
                continue
            assert task_id in self.outstanding, f"task {task_id} reported twice, or never started"
            self.outstanding.discard(task_id)
            self.reported.append(task_id)
            if task_id in self.live:
                self.old_runs.append((task_id, self.live.pop(task_id)))

    def started(self, starts: list[Start]) -> None:
        for start in starts:
            task_id, run = start[0], start[1]
            assert task_id not in self.live
            self.live[task_id] = run
            self.outstanding.add(task_id)

    def dispatch(self, groups: list, session: int | None = None, seq: int | None = None) -> None:
        session = self.session if session is None else session
        if seq is None:
            self.seq += 1
            seq = self.seq
        if session == self.state.session and self.state.draining:
            self.bounced |= {g[1][i] for g in groups if type(g) is list and len(g) > 1  # (a running one stays)
                             for i in range(0, len(g[1]) - 2, 3)
                             if type(g[1][i]) is int and g[1][i] not in self.state.running}
        elif session == self.session and seq == self.state.dispatch_seq + 1:
            self.sched_free -= sum(len(g[1]) // 3 for g in groups if type(g) is list and len(g) > 1)
        self.started(self.state.on_dispatch(7, session, seq, groups, self.now))
        self.carry_out()

    # ---- rules: the scheduler --------------------------------------------------------------

    @rule(n=st.integers(1, CONCURRENCY), duplicates=st.integers(0, 2), isolate=st.booleans())
    def honest_dispatch(self, n: int, duplicates: int, isolate: bool) -> None:
        n = min(n, self.sched_free)
        dup = [i for i in list(self.state.running)[:duplicates]][: max(0, self.sched_free - n)]
        flat: list = []
        for _ in range(n):
            flat += [self.next_id, 0, b"call"]
            self.next_id += 1
        for task_id in dup:
            flat += [task_id, 1, b"call"]
        if flat:
            self.dispatch([["tcp://sink:1", flat, 1] if isolate else ["tcp://sink:1", flat]])

    @rule(extra=st.integers(1, 4))
    def over_dispatch(self, extra: int) -> None:
        """A scheduler that sends more than the credit it was given: counted, never lost."""
        self.honest = False
        flat: list = []
        for _ in range(max(0, self.sched_free) + extra):
            flat += [self.next_id, 0, b"call"]
            self.next_id += 1
        self.dispatch([["tcp://sink:1", flat]])

    @rule(bad=st.sampled_from(["entry", "group", "partial"]))
    def malformed_dispatch(self, bad: str) -> None:
        if self.sched_free < 2:
            return
        if bad == "entry":
            groups: list = [["tcp://sink:1", ["not an id", 0, b"x", self.next_id, 0, b"call"]]]
            self.next_id += 1
        elif bad == "group":
            groups = [["tcp://sink:1"], 5, ["tcp://sink:1", [self.next_id, 0, b"call"]]]
            self.next_id += 1
        else:
            groups = [["tcp://sink:1", [self.next_id, 0, b"call", 99]]]
            self.next_id += 1
        self.dispatch(groups)

    @rule()
    def stale_dispatch(self) -> None:
        """A DISPATCH of an older session, crossing our HELLO: ignored, its tasks were requeued."""
        before = (dict(self.state.running), self.state.credit)
        self.dispatch([["tcp://sink:1", [self.next_id, 0, b"call"]]], session=self.session - 1, seq=1)
        self.next_id += 1
        assert (dict(self.state.running), self.state.credit) == before

    @rule()
    def lost_dispatch(self) -> None:
        """A gap in DISPATCH numbers: a new session (and HELLO) follows."""
        session = self.state.session
        if self.state.draining:
            return
        self.seq += 1  # the one lost on the way
        self.dispatch([["tcp://sink:1", [self.next_id, 0, b"call"]]])
        self.next_id += 1
        assert self.state.session == session + 1

    @rule(matching=st.booleans())
    def heartbeat(self, matching: bool) -> None:
        session = self.state.session
        self.state.on_heartbeat(7, self.session, self.seq if matching else self.seq + 3, self.now)
        self.carry_out()
        if matching:
            assert self.state.registered and self.state.session == session

    @rule()
    def register(self) -> None:
        self.state.on_register(7, self.now)
        self.carry_out()

    @rule(ids=st.lists(st.integers(-5, 400), max_size=5), own=st.booleans())
    def cancel(self, ids: list[int], own: bool) -> None:
        """A CANCEL: for running ids it interrupts; for any other id it changes nothing."""
        if own and self.live:
            ids = ids + [next(iter(self.live))]
        before = (dict(self.state.running), self.state.credit, list(self.state.finished))
        self.state.on_cancel(ids + ["junk"])  # type: ignore[list-item]
        commands = self.state.take()
        assert all(type(c) is Interrupt and c.task_id in self.state.running for c in commands)
        self.interrupts += commands  # type: ignore[arg-type]
        assert (dict(self.state.running), self.state.credit, list(self.state.finished)) == before

    # ---- rules: the driver -----------------------------------------------------------------

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 1000), failed=st.booleans())
    def finish(self, pick: int, failed: bool) -> None:
        task_id = sorted(self.live)[pick % len(self.live)]
        assert self.state.finish(task_id, self.live[task_id], failed)
        self.old_runs.append((task_id, self.live.pop(task_id)))

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 1000), delay=st.floats(0, 5))
    def retry(self, pick: int, delay: float) -> None:
        task_id = sorted(self.live)[pick % len(self.live)]
        assert self.state.retry(task_id, self.live[task_id], delay)
        self.old_runs.append((task_id, self.live.pop(task_id)))

    @precondition(lambda self: self.interrupts)
    @rule(confirm=st.booleans())
    def interrupted(self, confirm: bool) -> None:
        """The driver stops a run it was told to interrupt (or cannot: a sync call already started)."""
        command = self.interrupts.pop(0)
        current = self.state.is_current(command.task_id, command.run)
        if confirm:
            assert self.state.finish(command.task_id, command.run, False) == current
            if current:
                self.old_runs.append((command.task_id, self.live.pop(command.task_id)))

    @precondition(lambda self: self.old_runs)
    @rule(pick=st.integers(0, 1000), retry=st.booleans())
    def late_outcome(self, pick: int, retry: bool) -> None:
        """An outcome of a run that ended (cancelled, handed back, re-run): it changes nothing."""
        task_id, run = self.old_runs[pick % len(self.old_runs)]
        before = (dict(self.state.running), self.state.credit, list(self.state.finished))
        assert not (self.state.retry(task_id, run, 0.1) if retry else self.state.finish(task_id, run, True))
        assert (dict(self.state.running), self.state.credit, list(self.state.finished)) == before

    @rule(linger=st.booleans())
    def flush(self, linger: bool) -> None:
        if not linger or self.state.done_due():
            self.state.send_done()
            self.carry_out()

    @rule(seconds=st.sampled_from([0.01, 0.5, 2.0, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.state.tick(self.now)
        self.carry_out()

    @rule()
    def heard(self) -> None:
        self.state.heard(self.now)

    @precondition(lambda self: not self.state.draining)
    @rule(pick=st.integers(0, 1000))
    def drain(self, pick: int) -> None:
        """Leaving: some tasks the driver took back before they started are handed back."""
        back = sorted(self.live)[: pick % (len(self.live) + 1)]
        self.state.drain(back + [10**9])  # an id not running here is not handed back
        self.carry_out()
        assert self.state.done_due()  # a draining worker reports at once: nothing waits to gather more
        assert not any(task_id in self.state.running for task_id in back)

    @precondition(lambda self: self.state.draining and self.byes == 0)
    @rule()
    def give_up(self) -> None:
        left = self.state.give_up()
        self.carry_out()
        assert not self.state.running and self.byes == 1
        assert all(task_id not in self.outstanding for task_id in left)

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def valid(self) -> None:
        state = self.state
        state.validate()
        pending = set(state.finished) | set(state.retries[0::2])
        assert self.outstanding == set(state.running) | pending, "a started task is in no place, or in two"
        assert not set(state.running) & pending
        if self.session == state.session:
            assert self.sched_free == state.seen_free
        if self.honest:
            assert state.seen_free >= 0 and state.withheld >= 0, "an honest scheduler overdrew the credit"
        if state.draining and self.session == state.session:
            assert all(not isinstance(c, SendHello) or c.free == 0 for c in state.commands)


TestWorkerState = WorkerMachine.TestCase
TestWorkerState.settings = settings(max_examples=120, stateful_step_count=100, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow],
                                    phases=[Phase.explicit, Phase.reuse, Phase.generate])


def test_credit_is_conserved_through_a_session_change() -> None:
    """Tasks running at a new HELLO are named in it and hold their slots; a late DONE of the old session
    (sent before the HELLO) is not counted against the new one."""
    state = WorkerState(4, HEARTBEAT_S, TIMEOUT_S)
    state.hello(0.0)
    hello = state.take()[0]
    assert isinstance(hello, SendHello) and hello.free == 4
    starts = state.on_dispatch(1, hello.session, 1, [["s", [1, 0, b"a", 2, 0, b"b"]]], 0.0)
    assert [s[0] for s in starts] == [1, 2]
    assert state.finish(1, starts[0][1], failed=False)
    state.hello(1.0)
    done, again = state.take()
    assert isinstance(done, SendDone) and done.finished == [1] and done.session == hello.session
    assert isinstance(again, SendHello) and again.running == [2] and again.free == 3
    state.validate()
    assert not state.finish(2, starts[1][1] + 1, failed=False)  # no such run
    assert state.finish(2, starts[1][1], failed=True)
    state.send_done()
    (done,) = state.take()
    assert isinstance(done, SendDone) and done.credit == 1 and done.n_failed == 1
    state.validate()


def test_a_dispatch_crossing_our_drain_hands_back_only_what_does_not_run_here() -> None:
    """A redelivered id still running here stays ours (its DONE reports it); handed back, it would run twice."""
    state = WorkerState(4, HEARTBEAT_S, TIMEOUT_S)
    state.hello(0.0)
    (hello,) = state.take()
    starts = state.on_dispatch(1, hello.session, 1, [["s", [1, 0, b"a"]]], 0.0)
    state.drain([])
    state.take()
    assert state.on_dispatch(1, hello.session, 2, [["s", [1, 1, b"a", 2, 0, b"b"]]], 0.0) == []
    (back,) = state.take()
    assert isinstance(back, SendDrain) and back.handed_back == [2]
    assert state.finish(1, starts[0][1], failed=False)
    state.validate()
