"""Test hosts for pytest: network namespaces on a private bridge (see scripts/testhosts.py).

Not a test module: a helper that multi-host tests import.

Usage::

    from netns import hosts, spawn_in, kill_all, wait_until, require_netns, th  # noqa: F401  (hosts is a fixture)

    def test_across(hosts):                        # 3 hosts by default
        h1, h2, h3 = hosts                         # each a th.Host: .name .ip .veth .index
        p = spawn_in(h1, [sys.executable, "-m", "zfabric", "scheduler",
                          "--bind", f"tcp://{h1.ip}:7100"], stdout=subprocess.PIPE)
        ...

    @pytest.mark.parametrize("hosts", [5], indirect=True)            # 5 hosts
    @pytest.mark.parametrize("hosts", [{"n": 4, "delay_ms": 20}], indirect=True)
    def test_more(hosts): ...

    hosts_mod = make_hosts_fixture(n=4, scope="module")   # a shared, module-scoped set

When namespaces cannot be made (not root, no ``ip``, no veth/bridge support)
the fixture skips with the reason, visible in ``pytest -ra``. Teardown always
kills every process started with :func:`spawn_in` in those hosts, then removes
the hosts (which also SIGKILLs anything else still inside them), even when the
test failed or timed out.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "testhosts.py"


def _load_testhosts():
    # scripts/ is not a package: load the file by path, once, under a fixed name.
    mod = sys.modules.get("testhosts")
    if mod is not None and Path(getattr(mod, "__file__", "")).resolve() == _SCRIPT:
        return mod
    spec = importlib.util.spec_from_file_location("testhosts", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["testhosts"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


th = _load_testhosts()
Host = th.Host

# --------------------------------------------------------------------------- processes

_procs: list[subprocess.Popen] = []
_procs_lock = threading.Lock()


def spawn_in(host, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Start ``argv`` inside ``host``'s namespace; returns the ``Popen``.

    The command runs in a new session (its own process group) unless
    ``start_new_session=False`` is passed, so :func:`kill_all` takes its
    children too. stdin defaults to /dev/null. The process is remembered and
    killed by :func:`kill_all` / the ``hosts`` fixture teardown.
    """
    popen_kwargs.setdefault("start_new_session", True)
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(th.host_exec_argv(host, list(argv)), **popen_kwargs)
    proc.testhost = host.name if isinstance(host, Host) else str(host)  # type: ignore[attr-defined]
    with _procs_lock:
        _procs.append(proc)
    return proc


def kill_all(procs: Sequence[subprocess.Popen] | None = None, *, host=None, timeout: float = 10.0) -> None:
    """SIGKILL processes (and their process groups), reap them, close their pipes.

    With no arguments: every process started by :func:`spawn_in` still
    tracked. ``host`` restricts that to one host (a Host or namespace name).
    """
    if procs is None:
        name = None if host is None else (host.name if isinstance(host, Host) else str(host))
        with _procs_lock:
            procs = [p for p in _procs if name is None or getattr(p, "testhost", None) == name]
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            try:
                if os.getpgid(p.pid) == p.pid:  # its own group: take the children too
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
    with _procs_lock:
        _procs[:] = [p for p in _procs if p not in procs]


def wait_until(predicate: Callable[[], object], timeout: float, what: str = "condition",
               interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)  # sync-ok: polling interval of a deadline wait


# --------------------------------------------------------------------------- fixtures


def require_netns() -> None:
    """Skip the calling test (with the reason) unless test hosts can be made here."""
    ok, reason = th.netns_available()
    if not ok:
        pytest.skip(f"test hosts unavailable: {reason}")


def _params(request, n: int, delay_ms):
    p = getattr(request, "param", None)
    if isinstance(p, int):
        n = p
    elif isinstance(p, dict):
        n = p.get("n", n)
        delay_ms = p.get("delay_ms", delay_ms)
    elif p is not None:
        raise TypeError(f"hosts fixture param must be an int or a dict, not {p!r}")
    return n, delay_ms


def _hosts_impl(n: int, delay_ms) -> Iterator[list]:
    require_netns()
    prefix = th.unique_prefix()
    hosts = th.create_hosts(n, prefix, delay_ms)  # removes its own leftovers on failure
    try:
        yield hosts
    finally:
        try:
            for h in hosts:
                kill_all(host=h)
        finally:
            th.destroy_hosts(prefix)


def make_hosts_fixture(n: int = 3, delay_ms: float | None = None, scope: str = "function",
                       name: str | None = None):
    """Make a fixture giving ``n`` fresh hosts (a list of ``Host``), removed at teardown.

    Assign it to a module-level name in the test module; that name is the
    fixture's name unless ``name`` is given. Indirect parametrisation with an
    int (count) or a dict (``n``, ``delay_ms``) overrides the defaults.
    """

    @pytest.fixture(scope=scope, name=name)
    def _fixture(request):
        yield from _hosts_impl(*_params(request, n, delay_ms))

    return _fixture


hosts = make_hosts_fixture(n=3, name="hosts")
