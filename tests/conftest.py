"""Shared fixtures: real fabrics in real processes, and waiting on conditions with deadlines."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

import psutil
import pytest

TASKS = "zfabric.demo_tasks"
LOOPBACK = "127.0.0.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
              interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # sync-ok: polling interval of a deadline wait


async def async_wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)  # sync-ok: polling interval of a deadline wait


def free_port_pair() -> int:
    """A port P with P and P+1 both free on loopback (the fabric's intake and worker ports)."""
    for _ in range(200):
        with socket.socket() as a:
            a.bind((LOOPBACK, 0))
            port = a.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as b:
                try:
                    b.bind((LOOPBACK, port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def zfabric_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zfabric", *args]


def read_line_matching(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    """Read proc.stdout until a line matches (the process must not exit first)."""
    import selectors
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got: {''.join(seen)[-2000:]}")


@dataclass
class Fabric:
    """A `zfabric up` process: its address and its process tree."""

    proc: subprocess.Popen[str]
    address: str
    children: list[psutil.Process] = field(default_factory=list)

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        return [p for p in self.tree() if "worker" in p.cmdline()]

    def scheduler(self) -> psutil.Process:
        return next(p for p in self.tree() if "scheduler" in p.cmdline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for child in self.children:
            try:
                child.wait(10)
            except psutil.TimeoutExpired:
                child.kill()
        if self.proc.stdout:
            self.proc.stdout.close()


def start_fabric(workers: int = 2, apps: tuple[str, ...] = (TASKS,), extra: tuple[str, ...] = (),
                 log_level: str = "warning") -> Fabric:
    args = ["--log-level", log_level, "up", "--workers", str(workers), "--port", "0", *extra]
    for app in apps:
        args += ["--app", app]
    proc = subprocess.Popen(zfabric_cmd(*args), stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        m = read_line_matching(proc, r"(tcp://[0-9.]+:\d+)", 60)
    except BaseException:
        proc.kill()
        raise
    fabric = Fabric(proc, m.group(1))
    fabric.children = fabric.tree()
    return fabric


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    """A 2-worker fabric shared by a module's tests (they must not kill its processes)."""
    fab = start_fabric()
    yield fab
    fab.stop()


@pytest.fixture
def own_fabric() -> Iterator[Callable[..., Fabric]]:
    """Start fabrics a test may break; all are stopped afterwards."""
    started: list[Fabric] = []

    def start(**kwargs: Any) -> Fabric:
        fab = start_fabric(**kwargs)
        started.append(fab)
        return fab

    yield start
    for fab in started:
        fab.stop()


async def gather_all(awaitables: list[Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*awaitables, return_exceptions=True)
