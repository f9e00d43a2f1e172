"""A process supervisor for `zfabric up` and `zfabric.local` (layer 5).

The rule it keeps: children are plain `python -m zfabric ...` processes in
their own session (a terminal's Ctrl-C reaches only the supervisor, which
stops them in order: workers drain first, then the scheduler). A child that
dies unexpectedly is restarted with a back-off; every child dies with the
supervisor (see `runtime.die_with_parent`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from .errors import FabricError
from .runtime import PARENT_ENV, READY_PREFIX

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Child:
    role: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ready_text: str = ""
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = 0.5


class Supervisor:
    """Starts a scheduler and N workers and keeps them running until `stop()`."""

    def __init__(self, scheduler_args: list[str], worker_args: list[str], workers: int,
                 log_level: str = "info") -> None:
        self.log_level = log_level
        self.scheduler = Child("scheduler", ["scheduler", *scheduler_args])
        self.worker_args = worker_args
        self.workers = [Child(f"worker-{i + 1}", ["worker", *worker_args]) for i in range(workers)]
        self.address = ""
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        # glibc mmaps (and page-faults in) every block over 128 KiB: with MiB-sized payloads that is most of
        # the cost. Keep such blocks in the heap; at most 32 MiB of freed memory stays with a process.
        self._env.setdefault("MALLOC_MMAP_THRESHOLD_", str(8 << 20))
        self._env.setdefault("MALLOC_TRIM_THRESHOLD_", str(32 << 20))
        self._env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)

    async def start(self, timeout_s: float = 30.0) -> str:
        """Start everything; returns the fabric address once the scheduler is up and the workers registered."""
        await self._spawn(self.scheduler)
        await self._wait_ready([self.scheduler], timeout_s)
        self.address = self.scheduler.ready_text.split()[-1]
        for worker in self.workers:
            worker.argv = ["worker", self.address, *self.worker_args]
            await self._spawn(worker)
        await self._wait_ready(self.workers, timeout_s)
        self._watch = asyncio.create_task(self._watch_children())
        return self.address

    async def _wait_ready(self, children: list[Child], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(c.ready.is_set() for c in children):
            dead = [c for c in children if c.proc is not None and c.proc.returncode is not None]
            if dead or time.monotonic() > deadline:
                await self.stop()
                if dead:
                    raise FabricError(f"{dead[0].role} exited with code {dead[0].proc.returncode} "  # type: ignore
                                       "before it was ready (see its log above)")
                late = [c.role for c in children if not c.ready.is_set()]
                raise FabricError(f"{', '.join(late)} did not start within {timeout_s:g} s (see the log above)")
            waits = [asyncio.create_task(c.ready.wait()) for c in children if not c.ready.is_set()]
            _, pending = await asyncio.wait(waits, timeout=0.1)
            for w in pending:
                w.cancel()

    async def _spawn(self, child: Child) -> None:
        argv = [sys.executable, "-m", "zfabric", "--log-level", self.log_level, *child.argv]
        child.ready.clear()
        child.started_at = time.monotonic()
        child.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, env=self._env, start_new_session=True)
        asyncio.create_task(self._read_stdout(child, child.proc))
        log.debug("started %s (pid %d): %s", child.role, child.proc.pid, " ".join(argv))

    async def _read_stdout(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(READY_PREFIX):
                child.ready_text = line[len(READY_PREFIX):].strip()
                child.ready.set()
            elif line:
                print(f"[{child.role}] {line}", flush=True)

    async def _watch_children(self) -> None:
        while not self._stopping:
            for child in [self.scheduler, *self.workers]:
                proc = child.proc
                if proc is None or proc.returncode is None or self._stopping:
                    continue
                ran_for = time.monotonic() - child.started_at
                child.backoff_s = 0.5 if ran_for > 30 or not child.restarts else min(child.backoff_s * 2, 10.0)
                log.warning("%s (pid %d) exited with %s after %.1f s; restarting in %.1f s", child.role, proc.pid,
                            proc.returncode, ran_for, child.backoff_s)
                child.restarts += 1
                child.proc = None
                asyncio.create_task(self._restart(child))
            await asyncio.sleep(0.2)

    async def _restart(self, child: Child) -> None:
        await asyncio.sleep(child.backoff_s)
        if self._stopping:
            return
        if child is self.scheduler:
            self._pin_scheduler_address()
        await self._spawn(child)

    def _pin_scheduler_address(self) -> None:
        """A restarted scheduler must come back on the same address (clients and workers reconnect to it)."""
        argv = self.scheduler.argv
        if "--bind" in argv:
            argv[argv.index("--bind") + 1] = self.address

    def pids(self) -> list[int]:
        return [c.proc.pid for c in [self.scheduler, *self.workers] if c.proc is not None and c.proc.returncode is None]

    async def stop(self, grace_s: float = 15.0) -> None:
        """Workers drain (SIGTERM), then the scheduler stops; anything left after `grace_s` is killed."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        await self._terminate(self.workers, grace_s)
        await self._terminate([self.scheduler], 5.0)

    async def _terminate(self, children: list[Child], grace_s: float) -> None:
        procs = [c.proc for c in children if c.proc is not None and c.proc.returncode is None]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not procs:
            return
        done, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=grace_s)
        for proc in procs:
            if proc.returncode is None:
                log.warning("pid %d did not stop within %.0f s; killing it", proc.pid, grace_s)
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
                await proc.wait()
