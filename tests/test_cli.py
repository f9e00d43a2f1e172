"""The `zfabric` command line: through click's CliRunner and as real subprocesses on real sockets.

Every process a test starts is stopped (or killed) in a `finally`; nothing waits with a bare sleep —
each wait is on a condition with a deadline (`wait_for`, `read_line_matching`).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterable

import psutil
import pytest
from click.testing import CliRunner

import zfabric
from conftest import ROOT, TASKS, Fabric, async_wait_for, read_line_matching, wait_for, zfabric_cmd, free_port_pair
from zfabric.cli import main

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"


# ---- helpers --------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 45) -> subprocess.CompletedProcess[str]:
    """`python -m zfabric ARGS` to completion, output captured."""
    return subprocess.run(zfabric_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def popen(*args: str, env: dict[str, str] | None = None, stderr: Any = None) -> subprocess.Popen[str]:
    return subprocess.Popen(zfabric_cmd(*args), stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
                            env=env, start_new_session=True)


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def all_gone(procs: Iterable[psutil.Process]) -> bool:
    return all(gone(p) for p in procs)


def kill_all(procs: Iterable[psutil.Process | subprocess.Popen[str]]) -> None:
    """Last-resort cleanup: SIGKILL whatever still runs and reap it."""
    for p in procs:
        try:
            if isinstance(p, subprocess.Popen):
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
                if p.stdout:
                    p.stdout.close()
            elif not gone(p):
                p.kill()
                p.wait(10)
        except (psutil.NoSuchProcess, ProcessLookupError, psutil.TimeoutExpired, subprocess.TimeoutExpired):
            pass


def cleanup_up(fab: Fabric, recorded: Iterable[psutil.Process] = ()) -> None:
    """Kill `up` (if still running) and every child it has or had, so nothing outlives the test."""
    children = [*fab.tree(), *recorded]
    kill_all([fab.proc, *children])


def start_up(port: int, *extra: str, stderr: Any = None, workers: int = 2) -> tuple[Fabric, str]:
    """`zfabric up --workers N --app demo_tasks --port P`; returns the fabric and its announcement line."""
    proc = popen("up", "--workers", str(workers), "--app", TASKS, "--port", str(port), *extra, stderr=stderr)
    try:
        m = read_line_matching(proc, r".*(tcp://[0-9.]+:\d+).*", 60)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    fab = Fabric(proc, m.group(1))
    fab.children = fab.tree()
    return fab, m.group(0)


def status_json(address: str, timeout_s: float = 10) -> dict[str, Any] | None:
    """`zfabric status ADDR --json`, parsed; None if it failed."""
    out = run_cli("status", address, "--json", "--timeout-s", str(timeout_s), timeout=timeout_s + 30)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def live_worker_pids(fab: Fabric) -> set[int]:
    """Pids of the worker children of `up` that are alive (a killed one may linger as a zombie)."""
    pids = set()
    for p in fab.tree():
        try:
            if not gone(p) and "worker" in p.cmdline():
                pids.add(p.pid)
        except psutil.Error:  # exited (or became a zombie) while we looked
            pass
    return pids


# ---- CliRunner: help, version, bad input ------------------------------------------------------------

SUBCOMMAND_OPTIONS = {
    "up": ["--workers", "--app", "--port", "--bind", "--concurrency", "--threads", "--tag", "--resources",
           "--log-level"],
    "scheduler": ["--bind", "--max-deaths", "--metrics-port", "--heartbeat-s", "--worker-timeout-s", "--log-level"],
    "worker": ["ADDRESS", "--app", "--concurrency", "--threads", "--name", "--grace-s", "--heartbeat-s",
               "--tag", "--resources", "--log-level"],
    "submit": ["ADDRESS", "FUNCTION", "ARGS", "--kw", "--timeout-s", "--log-level"],
    "status": ["ADDRESS", "--json", "--timeout-s", "--log-level"],
    "sink": ["--bind", "--out", "--log-level"],
    "demo": ["--workers", "--tasks", "--log-level"],
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.timeout(30)
def test_group_help_lists_every_subcommand(runner: CliRunner) -> None:
    for flag in ("--help", "-h"):
        result = runner.invoke(main, [flag])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output and "--log-level" in result.output and "--version" in result.output
        for command in SUBCOMMAND_OPTIONS:
            assert command in result.output


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", sorted(SUBCOMMAND_OPTIONS))
def test_subcommand_help_lists_its_options(runner: CliRunner, command: str) -> None:
    result = runner.invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"{command} [OPTIONS]" in result.output
    for option in SUBCOMMAND_OPTIONS[command]:
        assert option in result.output, f"`zfabric {command} --help` does not mention {option}"


@pytest.mark.timeout(30)
def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert version("zfabric") in result.output


@pytest.mark.timeout(30)
def test_unknown_command_and_option_are_usage_errors(runner: CliRunner) -> None:
    result = runner.invoke(main, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.output
    result = runner.invoke(main, ["status", "tcp://127.0.0.1:7100", "--no-such-option"])
    assert result.exit_code == 2 and "No such option" in result.output
    result = runner.invoke(main, ["--log-level", "loud", "status", "--help"])
    assert result.exit_code == 2 and "--log-level" in result.output


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", [
    ["submit", "not-an-address", "m:f"],
    ["submit", "tcp://127.0.0.1", "m:f"],          # no port
    ["submit", "tcp://127.0.0.1:70000", "m:f"],    # port out of range
    ["status", "udp://127.0.0.1:7100"],
    ["status", "ipc://"],
])
def test_bad_address_is_a_clear_error(runner: CliRunner, command: list[str]) -> None:
    started = time.monotonic()
    result = runner.invoke(main, command)
    assert result.exit_code != 0
    assert "Error:" in result.output, result.output
    assert "address" in result.output or "port" in result.output, result.output
    assert "Traceback" not in result.output
    assert time.monotonic() - started < 5, "a malformed address must fail at once, not after a timeout"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flags, complaint", [
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "-3"], "--concurrency"),
    (["--threads", "-1"], "--threads"),
    (["--concurrency", "many"], "--concurrency"),
])
def test_worker_bad_options_are_refused(runner: CliRunner, flags: list[str], complaint: str) -> None:
    result = runner.invoke(main, ["worker", "tcp://127.0.0.1:1", *flags])
    assert result.exit_code == 2, result.output
    assert complaint in result.output and "Traceback" not in result.output


@pytest.mark.timeout(30)
def test_submit_bad_kw_is_refused(runner: CliRunner) -> None:
    result = runner.invoke(main, ["submit", "tcp://127.0.0.1:1", f"{TASKS}:add", "--kw", "novalue"])
    assert result.exit_code == 2
    assert "NAME=JSON" in result.output


@pytest.mark.timeout(45)
@pytest.mark.parametrize("name", ["bad name", "nocolon", "os:", ":system", "a b:c"])
def test_submit_bad_function_name_is_refused(runner: CliRunner, fabric: Fabric, name: str) -> None:
    result = runner.invoke(main, ["submit", fabric.address, name, "1", "--timeout-s", "20"])
    assert result.exit_code != 0
    assert "Error:" in result.output and "bad function reference" in result.output, result.output
    assert repr(name) in result.output
    assert "Traceback" not in result.output


@pytest.mark.timeout(45)
def test_runner_submit_and_status_against_a_fabric(runner: CliRunner, fabric: Fabric) -> None:
    result = runner.invoke(main, ["submit", fabric.address, f"{TASKS}:add", "2", "40", "--timeout-s", "20"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "42"
    result = runner.invoke(main, ["status", fabric.address, "--json", "--timeout-s", "20"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["workers"]) == 2


# ---- subprocess: submit and status against `zfabric up` -----------------------------------------------


@pytest.mark.timeout(60)
def test_submit_prints_the_result_as_json(fabric: Fabric) -> None:
    out = run_cli("submit", fabric.address, f"{TASKS}:add", "2", "40")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arg, expected", [
    ('[1, "a", {"b": null}, [2.5, true]]', [1, "a", {"b": None}, [2.5, True]]),
    ('{"k": [1, 2], "n": -3}', {"k": [1, 2], "n": -3}),
    ("hello world", "hello world"),      # not JSON: passed as a string
    ('"42"', "42"),                      # a JSON string stays a string
    ("null", None),
])
def test_submit_values_round_trip_as_json(fabric: Fabric, arg: str, expected: Any) -> None:
    out = run_cli("submit", fabric.address, f"{TASKS}:echo", arg)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected


@pytest.mark.timeout(60)
def test_submit_async_function_and_keyword_arguments(fabric: Fabric) -> None:
    out = run_cli("submit", fabric.address, f"{TASKS}:add", "--kw", "a=1", "--kw", "b=41")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    out = run_cli("submit", fabric.address, f"{TASKS}:asleep", "0.01", "--kw", 'value={"x": [1, 2]}')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"x": [1, 2]}


@pytest.mark.timeout(60)
def test_submit_remote_exception_exits_nonzero_naming_it(fabric: Fabric) -> None:
    out = run_cli("submit", fabric.address, f"{TASKS}:fail", "kaboom-123")
    assert out.returncode != 0
    assert out.stdout == ""
    assert "ValueError" in out.stderr and "kaboom-123" in out.stderr
    assert "demo_tasks.py" in out.stderr  # the remote traceback is shown


@pytest.mark.timeout(60)
def test_submit_os_system_is_refused_and_the_fabric_keeps_serving(fabric: Fabric, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    out = run_cli("submit", fabric.address, "os:system", json.dumps(f"touch {marker}"))
    assert out.returncode != 0
    assert "os:system" in out.stderr and "not allowed" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not marker.exists()
    out = run_cli("submit", fabric.address, "os:system", '"true"')
    assert out.returncode != 0 and "not allowed" in out.stderr
    out = run_cli("submit", fabric.address, f"{TASKS}:add", "1", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


@pytest.mark.timeout(60)
def test_status_shows_the_two_workers(fabric: Fabric) -> None:
    pids = {p.pid for p in fabric.workers()}
    assert len(pids) == 2
    out = run_cli("status", fabric.address)
    assert out.returncode == 0, out.stderr
    assert "workers: 2" in out.stdout
    for pid in pids:
        assert f"pid {pid}" in out.stdout
    for word in ("queued", "running", "done", "failed"):
        assert word in out.stdout

    info = status_json(fabric.address)
    assert info is not None
    assert len(info["workers"]) == 2
    assert {w["pid"] for w in info["workers"]} == pids
    for key in ("queued", "running", "done", "failed"):
        assert isinstance(info[key], int)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [
    ["status"],
    ["submit", "{address}", f"{TASKS}:add", "1", "2"],
])
def test_nothing_listening_fails_clearly_within_the_timeout(command: list[str]) -> None:
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    argv = [a.format(address=address) for a in command]
    if argv == ["status"]:
        argv.append(address)
    started = time.monotonic()
    out = run_cli(*argv, "--timeout-s", "2", timeout=40)
    elapsed = time.monotonic() - started
    assert out.returncode != 0
    assert "Error:" in out.stderr and address in out.stderr and "2 s" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert elapsed < 2 + 20, f"took {elapsed:.1f} s with --timeout-s 2"  # 2 s plus interpreter start-up on a busy box


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", [["status"], ["submit", f"{TASKS}:add", "1", "2"]])
def test_runner_nothing_listening_fails_after_timeout_s(runner: CliRunner, command: list[str]) -> None:
    """In-process (no interpreter start-up to allow for): the error comes after --timeout-s, not much later."""
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    started = time.monotonic()
    result = runner.invoke(main, [command[0], address, *command[1:], "--timeout-s", "1.5"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert "no scheduler answered" in result.output and "1.5 s" in result.output
    assert 1.4 <= elapsed < 1.5 + 8, f"took {elapsed:.1f} s with --timeout-s 1.5"


# ---- zfabric up: announcement, signals, no process left behind, restarts ---------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_announces_its_address_and_stops_on_signal_leaving_nothing(sig: signal.Signals) -> None:
    port = free_port_pair()
    fab, line = start_up(port)
    recorded: list[psutil.Process] = []
    try:
        assert f"tcp://127.0.0.1:{port}" in line
        recorded = list(fab.children)
        assert len([p for p in recorded if "worker" in p.cmdline()]) == 2
        assert len([p for p in recorded if "scheduler" in p.cmdline()]) == 1
        out = run_cli("submit", fab.address, f"{TASKS}:add", "2", "40")
        assert out.stdout.strip() == "42", out.stderr
        recorded += [p for p in fab.tree() if p.pid not in {r.pid for r in recorded}]

        fab.proc.send_signal(sig)
        assert fab.proc.wait(30) == 0
        wait_for(lambda: all_gone(recorded), 15, "every child of `zfabric up` to exit")
        # and the port is free again
        with socket.socket() as s:
            s.bind((LOOPBACK, port))
    finally:
        cleanup_up(fab, recorded)


@pytest.mark.timeout(90)
def test_children_exit_when_up_is_sigkilled() -> None:
    fab, _ = start_up(0)
    children = list(fab.children)
    try:
        assert len(children) == 3
        fab.proc.kill()
        fab.proc.wait(10)
        wait_for(lambda: all_gone(children), 20, "the scheduler and workers to notice `up` died and exit")
    finally:
        cleanup_up(fab, children)


@pytest.mark.timeout(90)
def test_up_restarts_a_killed_worker() -> None:
    fab, _ = start_up(0)
    recorded = list(fab.children)
    try:
        before = live_worker_pids(fab)
        assert len(before) == 2
        victim = psutil.Process(min(before))
        victim.kill()
        wait_for(lambda: gone(victim), 10, "the killed worker to die")

        def replaced() -> set[int] | None:
            pids = live_worker_pids(fab)
            return pids if len(pids) == 2 and victim.pid not in pids else None

        now = wait_for(replaced, 30, "`up` to start a new worker")
        assert len(now - before) == 1
        recorded += [p for p in fab.tree() if p.pid in now]

        def status_matches() -> bool:
            info = status_json(fab.address)
            return info is not None and {w["pid"] for w in info["workers"]} == now

        wait_for(status_matches, 40, "`zfabric status` to show the 2 live workers", interval=0.3)
        out = run_cli("submit", fab.address, f"{TASKS}:add", "2", "40")
        assert out.stdout.strip() == "42", out.stderr

        fab.proc.send_signal(signal.SIGINT)
        assert fab.proc.wait(30) == 0
        wait_for(lambda: all_gone(recorded), 15, "every child to exit")
    finally:
        cleanup_up(fab, recorded)


@pytest.mark.timeout(90)
def test_up_log_level_debug(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    with log.open("w") as err:
        fab, line = start_up(0, "--log-level", "debug", stderr=err)
    recorded = list(fab.children)
    try:
        assert "tcp://127.0.0.1:" in line
        for child in recorded:  # the level reaches the children too
            assert "--log-level debug" in " ".join(child.cmdline())
        out = run_cli("submit", fab.address, f"{TASKS}:add", "2", "40")
        assert out.stdout.strip() == "42", out.stderr
        fab.proc.send_signal(signal.SIGINT)
        assert fab.proc.wait(30) == 0
        wait_for(lambda: all_gone(recorded), 15, "every child to exit")
        text = log.read_text()
        assert "DEBUG" in text, text[-2000:]
    finally:
        cleanup_up(fab, recorded)


# ---- scheduler and worker as separate processes -------------------------------------------------------

BYTES_APP = """
def blob(n):
    return bytes(range(256)) * n

def size(data):
    return len(data)
"""


@pytest.fixture
def bytes_app(tmp_path: Path) -> dict[str, str]:
    """An --app module that returns bytes, importable by a worker through PYTHONPATH."""
    (tmp_path / "zf_cli_bytes_app.py").write_text(textwrap.dedent(BYTES_APP))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.timeout(90)
def test_scheduler_and_worker_as_separate_processes(bytes_app: dict[str, str]) -> None:
    port = free_port_pair()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen[str]] = []
    try:
        sched = popen("scheduler", "--bind", address)
        procs.append(sched)
        m = read_line_matching(sched, r"^ZFABRIC-READY (.*)$", 60)
        assert address in m.group(1)

        worker = popen("worker", address, "--app", TASKS, "--app", "zf_cli_bytes_app", "--name", "cli-w1",
                       "--grace-s", "5", env=bytes_app)
        procs.append(worker)
        read_line_matching(worker, r"^ZFABRIC-READY ", 60)

        out = run_cli("submit", address, f"{TASKS}:add", "2", "40")
        assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
        # bytes come back as {"base64": ...}
        out = run_cli("submit", address, "zf_cli_bytes_app:blob", "1")
        assert out.returncode == 0, out.stderr
        assert base64.b64decode(json.loads(out.stdout)["base64"]) == bytes(range(256))

        info = status_json(address)
        assert info is not None and [w["name"] for w in info["workers"]] == ["cli-w1"]
        assert info["workers"][0]["pid"] == worker.pid

        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.wait(5 + 30) == 0
        assert time.monotonic() - started < 5, "an idle worker must stop within its grace period (5 s)"
        sched.send_signal(signal.SIGTERM)
        assert sched.wait(20) == 0
    finally:
        kill_all(procs)


@pytest.mark.timeout(90)
def test_worker_sigterm_while_busy_exits_zero_within_grace() -> None:
    """A worker with a task running drains: it exits 0 within its grace period, and the task still finishes."""
    port = free_port_pair()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen[str]] = []
    try:
        sched = popen("scheduler", "--bind", address)
        procs.append(sched)
        read_line_matching(sched, r"^ZFABRIC-READY ", 60)
        worker = popen("worker", address, "--app", TASKS, "--grace-s", "8")
        procs.append(worker)
        read_line_matching(worker, r"^ZFABRIC-READY ", 60)

        submit = subprocess.Popen(zfabric_cmd("submit", address, f"{TASKS}:asleep", "4.0", "done"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(submit)

        def running() -> bool:
            info = status_json(address)
            return info is not None and info["running"] == 1

        wait_for(running, 30, "the task to run on the worker", interval=0.1)
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.wait(8 + 30) == 0
        assert time.monotonic() - started < 8 + 2, "the worker must stop within its grace period (8 s)"
        out, err = submit.communicate(timeout=30)
        assert submit.returncode == 0, err
        assert json.loads(out) == "done"
    finally:
        kill_all(procs)


# ---- standalone sink ----------------------------------------------------------------------------------


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


@pytest.mark.timeout(90)
async def test_sink_writes_one_json_line_per_task(fabric: Fabric, tmp_path: Path) -> None:
    port = free_port_pair()
    sink_address = f"tcp://127.0.0.1:{port}"
    out_file = tmp_path / "results.jsonl"
    sink = popen("sink", "--bind", sink_address, "--out", str(out_file))
    try:
        m = read_line_matching(sink, r"^ZFABRIC-READY (.*)$", 60)
        assert sink_address in m.group(1)
        n = 50
        async with zfabric.Client(fabric.address, results_to=sink_address) as client:
            handles = [client.submit(f"{TASKS}:add", i, 1000) for i in range(n)]
            failing = client.submit(f"{TASKS}:fail", "in-the-sink")
            blob = client.submit(f"{TASKS}:echo", b"\x00\xff")
            for h in [*handles, failing, blob]:
                await h  # done once the scheduler accepted it
            ids = {h.id for h in handles} | {failing.id, blob.id}
            await async_wait_for(lambda: len(_complete_lines(out_file)) >= n + 2, 30, "the sink to write every result")
        records = _complete_lines(out_file)
        assert len(records) == n + 2
        assert {r["id"] for r in records} == ids  # one line per task id
        by_id = {r["id"]: r for r in records}
        for i, h in enumerate(handles):
            assert by_id[h.id]["status"] == "ok" and by_id[h.id]["value"] == i + 1000
        assert by_id[failing.id]["error"]["type"] == "ValueError"
        assert by_id[failing.id]["error"]["message"] == "in-the-sink"
        assert by_id[blob.id]["value"] == {"base64": "AP8="}

        sink.send_signal(signal.SIGTERM)
        assert sink.wait(20) == 0
    finally:
        kill_all([sink])


# ---- demo ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_demo_runs_to_completion_with_a_summary() -> None:
    """About 5 s on an idle 2-core machine; the deadline is generous because the box may be shared."""
    proc = popen("demo", "--tasks", "500", "--workers", "2", stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        assert "Summary" in out
        assert "tasks/s" in out and "p50" in out
        assert "100%" in err  # progress was shown
    finally:
        kill_all([proc])


# ---- start-up failures: clear errors, nothing left behind ---------------------------------------------


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if text in " ".join(p.info["cmdline"] or []) and not gone(p):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.timeout(90)
def test_up_with_a_worker_that_cannot_start_fails_and_leaves_nothing() -> None:
    port = free_port_pair()
    started = time.monotonic()
    out = run_cli("up", "--workers", "1", "--app", "no_such_module_zf", "--port", str(port), timeout=60)
    assert out.returncode != 0
    assert "zfabric is up" not in out.stdout
    assert "no_such_module_zf" in out.stderr
    assert time.monotonic() - started < 45
    wait_for(lambda: not _processes_mentioning(f"127.0.0.1:{port}"), 15, "no zfabric process left on that port")


@pytest.mark.timeout(90)
def test_up_with_a_worker_that_cannot_start_ends_with_a_clean_error() -> None:
    out = run_cli("up", "--workers", "1", "--app", "no_such_module_zf", "--port", str(free_port_pair()), timeout=60)
    assert out.returncode != 0
    assert _last_line(out.stderr).startswith("Error:"), out.stderr[-1500:]


@pytest.mark.timeout(30)
def test_worker_with_a_missing_app_module_is_a_clear_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["worker", "tcp://127.0.0.1:1", "--app", "no_such_module_zf"])
    assert result.exit_code != 0
    assert "Error:" in result.output and "cannot import app module 'no_such_module_zf'" in result.output, (
        result.output, result.exception)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["scheduler", "sink"])
def test_bind_on_a_busy_port_is_a_clear_error(command: str) -> None:
    port = free_port_pair()
    with socket.socket() as busy:
        busy.bind((LOOPBACK, port))
        busy.listen()
        out = run_cli(command, "--bind", f"tcp://127.0.0.1:{port}", timeout=40)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-1500:]
    assert str(port) in out.stderr and "in use" in out.stderr.lower()


@pytest.mark.timeout(60)
def test_up_refuses_a_negative_worker_count() -> None:
    proc = popen("up", "--workers", "-1", "--port", "0", "--app", TASKS, stderr=subprocess.DEVNULL)
    try:
        try:
            read_line_matching(proc, r"zfabric is up", 30)
        except AssertionError:  # it exited without starting: what we want
            assert proc.wait(10) == 2
        else:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            raise AssertionError("`zfabric up --workers -1` started a fabric")
    finally:
        kill_all([proc])
