"""The scheduler state machine without sockets: events and `now` in, frames out."""

from __future__ import annotations

from typing import Any

import pytest

from zfabric.config import SchedulerConfig, Timing
from zfabric.protocol import Kind, Status, decode, decode_error
from zfabric.scheduling import SchedulerState

pytestmark = pytest.mark.timeout(30)

CID, SINK = b"c" * 8, "tcp://127.0.0.1:9000"


def make(**cfg: Any) -> SchedulerState:
    return SchedulerState(SchedulerConfig(timing=Timing(heartbeat_s=0.5, worker_timeout_s=2.5,
                                                        client_timeout_s=10.0), **cfg), epoch=7)


def sent(state: SchedulerState, where: str | None = None) -> list[tuple[str, Any, Kind, list[Any]]]:
    out = [(w, dest, *decode(frame)) for w, dest, frame in state.outbox if w != "close"]
    state.outbox.clear()
    return [o for o in out if where is None or o[0] == where]


def dispatched(state: SchedulerState) -> dict[bytes, list[int]]:
    by_worker: dict[bytes, list[int]] = {}
    for _, wid, kind, fields in sent(state, "worker"):
        if kind == Kind.DISPATCH:
            for group in fields[3]:
                by_worker.setdefault(wid, []).extend(group[1][0::3])
    return by_worker


def submit(state: SchedulerState, ids: list[int], priority: int = 0, now: float = 0.0) -> None:
    flat: list[Any] = []
    for i in ids:
        flat += [i, priority, b"p%d" % i]
    state.submit(CID, SINK, "", flat, now)
    state.dispatch()  # the driver dispatches once per received batch


def test_first_contact_welcomes_and_accepts() -> None:
    s = make()
    submit(s, [1, 2])
    assert [o[2] for o in sent(s, "client")] == [Kind.WELCOME]
    s.tick(0.1)  # acknowledgements go out in batches, each tick
    out = [o for o in sent(s, "client") if o[2] == Kind.ACCEPTED]
    assert list(out[0][3]) == [7, [1, 2]]
    assert s.n_queued == 2


def test_dispatch_respects_credit_and_prefers_most_free() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 1, [], 1, "h", 0.0)
    s.worker_hello(b"B", "b", 1, 3, [], 2, "h", 0.0)
    sent(s)
    submit(s, [1])
    assert dispatched(s) == {b"B": [1]}
    submit(s, list(range(2, 10)))
    got = dispatched(s)
    assert len(got[b"A"]) == 1 and len(got[b"B"]) == 2
    assert s.n_queued == 5


def test_fast_tasks_go_out_in_big_shares_slow_ones_spread() -> None:
    """Issue 10: while the fabric finishes tasks fast, a dispatch does not cut a batch into one message per
    worker (DISPATCH and DONE per task would grow with the workers); slow tasks still spread."""
    from zfabric.scheduling import MAX_SHARE, MIN_SHARE
    s = make(max_queued=100_000)
    for i in range(100):
        s.worker_hello(b"w%d" % i, "w", 1, 1000, [], 1, "h", 0.0)
    s.tick(0.0)
    sent(s)
    submit(s, list(range(1, 1001)))  # nothing finished yet: spread, MIN_SHARE each
    first = dispatched(s)
    assert len(first) == -(-1000 // MIN_SHARE)
    for wid, ids in first.items():  # all finish within 10 ms: 100,000 tasks/s
        s.worker_done(wid, 1, 1, len(ids), ids, 0, [], 0.01)
    s.tick(0.01)
    sent(s)
    submit(s, list(range(1001, 2001)), now=0.01)
    assert sorted(len(ids) for ids in dispatched(s).values()) == [MAX_SHARE] * (1000 // MAX_SHARE)
    for t in (0.1, 0.2, 0.3):  # nothing finishes any more: the rate decays, tasks spread again
        s.tick(t)
    sent(s)
    submit(s, list(range(2001, 3001)), now=0.3)
    assert len(dispatched(s)) == -(-1000 // MIN_SHARE)
    s.validate()


def test_priority_order() -> None:
    s = make()
    submit(s, [1, 2], priority=0)
    submit(s, [3], priority=5)
    submit(s, [4], priority=-1)
    s.worker_hello(b"A", "a", 1, 4, [], 1, "h", 0.0)
    assert dispatched(s)[b"A"] == [3, 1, 2, 4]


def test_done_returns_credit_and_forgets_task() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 1, [], 1, "h", 0.0)
    submit(s, [1, 2])
    assert dispatched(s) == {b"A": [1]}
    s.worker_done(b"A", 1, 1, 1, [1], 0, [], 0.1)
    assert dispatched(s) == {b"A": [2]}
    assert 1 not in s.tasks and s.counters.done == 1


def test_resubmission_of_held_id_is_idempotent() -> None:
    s = make()
    submit(s, [1])
    submit(s, [1])
    assert s.n_queued == 1 and s.counters.duplicates == 1


def test_id_of_another_client_is_rejected() -> None:
    s = make()
    submit(s, [1])
    sent(s)
    s.submit(b"d" * 8, "tcp://127.0.0.1:9001", "", [1, 0, b"x"], 0.0)
    kinds = {o[2]: o[3] for o in sent(s, "client")}
    assert kinds[Kind.REJECTED][1][0] == 1 and "another client" in kinds[Kind.REJECTED][1][1]


def test_full_scheduler_rejects() -> None:
    s = make(max_queued=2)
    submit(s, [1, 2, 3])
    s.tick(0.1)
    kinds = {o[2]: o[3] for o in sent(s, "client")}
    assert kinds[Kind.ACCEPTED][1] == [1, 2]
    assert kinds[Kind.REJECTED][1][0] == 3 and "full" in kinds[Kind.REJECTED][1][1]


def test_malformed_entries_are_counted_not_raised() -> None:
    s = make()
    assert s.submit(CID, SINK, "", [1, "x", b"p", "bad", 0, b"p", 2, 0, b"ok"], 0.0) == 2
    assert set(s.tasks) == {2}


def test_silent_worker_tasks_go_elsewhere_at_front() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 2, [], 1, "h", 0.0)
    submit(s, [1, 2, 3])
    assert dispatched(s) == {b"A": [1, 2]}
    s.worker_hello(b"B", "b", 1, 5, [], 2, "h", 1.0)
    assert dispatched(s) == {b"B": [3]}
    s.worker_heartbeat(b"B", 1, 0, 3.0)
    s.tick(3.0)  # A silent for 3 s > 2.5 s
    assert b"A" not in s.workers
    assert sorted(dispatched(s)[b"B"]) == [1, 2]
    assert s.counters.redelivered == 2


def test_poison_task_whose_workers_keep_dying_fails_in_the_end() -> None:
    """A suspect that kills even the workers it runs isolated on (an old worker without child isolation)
    fails with WorkerLost after max_deaths - 1 shared and MAX_LOST_ALONE isolated deaths."""
    from zfabric.scheduling import MAX_LOST_ALONE
    s = make(max_deaths=3)
    submit(s, [1])
    for i in range(2 + MAX_LOST_ALONE):
        wid = b"W%d" % i
        s.worker_hello(wid, "w", 1, 1, [], i, "h", float(i))
        assert dispatched(s) == {wid: [1]}
        s.worker_lost(wid, "killed")
    results = [o for o in sent(s, "client") if o[2] == Kind.RESULT]
    assert len(results) == 1
    task_id, status, data = results[0][3][0]
    assert (task_id, status) == (1, Status.LOST)
    assert decode_error(data)[0] == "WorkerLost" and f"{2 + MAX_LOST_ALONE} workers" in decode_error(data)[1]
    assert not s.tasks


def test_rehello_keeps_running_tasks_and_requeues_the_rest() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 3, [], 1, "h", 0.0)
    submit(s, [1, 2, 3])
    dispatched(s)
    s.worker_hello(b"A", "a", 2, 1, [2], 1, "h", 1.0)  # lost DISPATCH: it runs only 2
    assert s.tasks[2].worker is s.workers[b"A"]  # still running there
    assert dispatched(s) == {b"A": [1]}  # 1 and 3 went back to the queue; one free slot takes 1
    assert s.tasks[3].state == 0 and s.n_queued == 1


def test_done_sequence_gap_asks_for_registration() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 3, [], 1, "h", 0.0)
    sent(s)
    s.worker_done(b"A", 1, 2, 0, [], 0, [], 0.1)  # seq 1 never arrived
    assert any(o[2] == Kind.REGISTER for o in sent(s, "worker"))


def test_unknown_worker_is_asked_to_register() -> None:
    s = make()
    s.worker_heartbeat(b"X", 1, 0, 0.0)
    assert [o[2] for o in sent(s)] == [Kind.REGISTER]


def test_retry_is_delayed_then_requeued() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 1, [], 1, "h", 0.0)
    submit(s, [1])
    dispatched(s)
    s.worker_done(b"A", 1, 1, 1, [], 0, [1, 0.5], 1.0)
    assert s.tasks[1].tries == 1 and dispatched(s) == {}
    s.tick(1.6)
    assert dispatched(s) == {b"A": [1]}


def test_cancel_queued_and_running() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 1, [], 1, "h", 0.0)
    submit(s, [1, 2])
    dispatched(s)
    s.cancel(CID, [1, 2], 0.1)
    cancels = [o for o in sent(s, "worker") if o[2] == Kind.CANCEL]
    assert cancels and cancels[0][3][2] == [1]
    assert not s.tasks and s.n_queued == 0


def test_silent_client_is_forgotten_with_its_tasks() -> None:
    s = make()
    submit(s, [1, 2], now=0.0)
    s.tick(11.0)
    assert not s.clients and not s.tasks and s.n_queued == 0
    assert any(w == "close" for w, _, _ in s.outbox)


def test_drain_hands_back_tasks() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 2, [], 1, "h", 0.0)
    submit(s, [1, 2])
    dispatched(s)
    s.worker_drain(b"A", 1, [2], 0.5)
    s.worker_hello(b"B", "b", 1, 1, [], 2, "h", 0.6)
    s.validate()
    assert dispatched(s) == {b"B": [2]}


def test_suspects_run_isolated_and_shared_deaths_fail_nobody() -> None:
    """Finding 2: a death is no evidence against the tasks that shared the worker. After two, tasks run
    isolated (in a child process: DISPATCH group flag 1), one per worker; a worker dying while its
    suspect runs isolated fails the suspect only after MAX_LOST_ALONE such deaths."""
    from zfabric.scheduling import MAX_LOST_ALONE
    s = make(max_deaths=3)
    submit(s, [1, 2, 3, 4])
    for i in range(2):
        wid = b"W%d" % i
        s.worker_hello(wid, "w", 1, 10, [], i, "h", float(i))
        assert sorted(dispatched(s)[wid]) == [1, 2, 3, 4]
        s.worker_lost(wid, "killed")
    assert s.status()["suspects"] == 4
    s.worker_hello(b"X", "x", 1, 10, [], 9, "h", 3.0)
    s.worker_hello(b"Y", "y", 1, 10, [], 9, "h", 3.0)
    groups = {dest: decode(frame)[1][3] for where, dest, frame in s.outbox
              if where == "worker" and decode(frame)[0] == Kind.DISPATCH}
    assert {d: [g[1][0::3] for g in gs] for d, gs in groups.items()} == {b"X": [[1]], b"Y": [[2]]}
    assert all(len(g) == 3 and g[2] == 1 for gs in groups.values() for g in gs)  # run isolated
    sent(s)
    for n in range(MAX_LOST_ALONE - 1):
        s.worker_lost(b"X", "killed while 1 ran isolated")
        s.worker_hello(b"X", "x", 2 + n, 10, [], 9, "h", 4.0)
    assert s.counters.lost == 0 and 1 in s.tasks
    s.validate()


def test_audit_names_tasks_not_held() -> None:
    s = make()
    submit(s, [1, 2])
    s.worker_hello(b"A", "a", 1, 5, [], 1, "h", 0.0)
    s.worker_done(b"A", 1, 1, 1, [1], 0, [], 0.1)
    sent(s)
    s.audit(CID, SINK, [1, 2, 3], 0.2)
    missing = [o for o in sent(s, "client") if o[2] == Kind.MISSING]
    assert list(missing[0][3]) == [7, [1, 3]]


def test_restarted_scheduler_adopts_tasks_still_running_on_a_worker() -> None:
    s = make()
    s.worker_hello(b"A", "a", 1, 8, [5, 6], 1, "h", 0.0)  # a worker that ran 5 and 6 for the old scheduler
    sent(s)
    submit(s, [5, 6, 7])  # the client resubmits everything unfinished
    assert dispatched(s) == {b"A": [7]}  # 5 and 6 are not run a second time
    assert s.tasks[5].worker is s.workers[b"A"] and s.tasks[5].state == 1
    s.worker_done(b"A", 1, 1, 2, [5, 6], 0, [], 1.0)
    assert set(s.tasks) == {7} and s.workers[b"A"].free == 9
