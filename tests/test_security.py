"""CURVE: strangers without an allowed key cannot submit, join, or inject results; fail closed."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import zmq

import zfabric
from zfabric import demo_tasks
from zfabric.config import SchedulerConfig
from zfabric.errors import ConfigError
from zfabric.protocol import Kind, Status, encode_fields, encode_value
from zfabric.security import generate_keys
from conftest import TASKS, ROOT, read_line_matching, zfabric_cmd

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("curve") / "keys"
    generate_keys(str(path))
    return path


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Path:
    """Keys nobody allowed, plus the scheduler's PUBLIC key (a stranger can know it)."""
    path = tmp_path_factory.mktemp("stranger") / "keys"
    generate_keys(str(path))
    shutil.copyfile(keys / "scheduler.key", path / "scheduler.key")
    return path


@pytest.fixture(scope="module")
def secure(keys: Path):
    proc = subprocess.Popen(zfabric_cmd("--log-level", "warning", "up", "--workers", "2", "--port", "0",
                                        "--app", TASKS, "--curve", str(keys)),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        address = read_line_matching(proc, r"(tcp://[0-9.]+:\d+)", 60).group(1)
        yield address
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stdout.close()


def test_keys_are_private_and_allow_lists_are_per_role(keys: Path) -> None:
    for name in ("scheduler", "worker", "client"):
        mode = stat.S_IMODE(os.stat(keys / f"{name}.key_secret").st_mode)
        assert mode == 0o600
    assert sorted(p.name for p in (keys / "allowed" / "clients").iterdir()) == ["client.key"]
    assert sorted(p.name for p in (keys / "allowed" / "workers").iterdir()) == ["worker.key"]
    assert sorted(p.name for p in (keys / "allowed" / "fabric").iterdir()) == ["scheduler.key", "worker.key"]


async def test_allowed_client_works(secure: str, keys: Path) -> None:
    async with zfabric.Client(secure, curve=zfabric.CurveConfig(str(keys))) as client:
        assert "#curve=" in client.sink_address
        assert await client.submit(demo_tasks.add, 2, 40) == 42
        assert len((await client.status())["workers"]) == 2


async def _status(secure: str, keys: Path) -> dict:
    async with zfabric.Client(secure, curve=zfabric.CurveConfig(str(keys))) as client:
        return await client.status()


@pytest.mark.parametrize("who", ["stranger-key", "null-security", "worker-key-as-client"])
async def test_unauthorised_clients_cannot_submit(secure: str, keys: Path, stranger: Path, who: str) -> None:
    before = await _status(secure, keys)
    curve = {"stranger-key": zfabric.CurveConfig(str(stranger)), "null-security": None,
             "worker-key-as-client": zfabric.CurveConfig(str(keys), "worker")}[who]
    with pytest.raises(zfabric.FabricUnreachable):
        async with zfabric.Client(secure, timeout_s=1.5, curve=curve):
            pass
    after = await _status(secure, keys)
    assert after["submitted"] == before["submitted"] + 0
    assert after["clients"] == 1  # only the status client itself


@pytest.mark.parametrize("who", ["stranger-key", "null-security", "client-key-as-worker"])
def test_unauthorised_workers_cannot_join(secure: str, keys: Path, stranger: Path, who: str) -> None:
    args = {"stranger-key": ["--curve", str(stranger)], "null-security": [],
            "client-key-as-worker": ["--curve", str(keys), "--curve-name", "client"]}[who]
    proc = subprocess.Popen(zfabric_cmd("--log-level", "warning", "worker", secure, "--app", TASKS, *args),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        with pytest.raises(AssertionError, match="no line matching"):
            read_line_matching(proc, "ZFABRIC-READY", 4)  # it never registers
        assert len(asyncio.run(_status(secure, keys))["workers"]) == 2
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


async def test_strangers_cannot_inject_results_into_a_sink(secure: str, keys: Path, stranger: Path) -> None:
    async with zfabric.Client(secure, curve=zfabric.CurveConfig(str(keys))) as client:
        handle = client.submit(demo_tasks.asleep, 1.0, "real")
        endpoint = client.sink_address.split("#")[0]
        forged = encode_fields(Kind.RESULT, [handle.id, Status.OK, encode_value("forged")])
        ctx = zmq.Context.instance()
        plain = ctx.socket(zmq.PUSH)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(endpoint)
        plain.send(forged)  # queued: a NULL peer never completes the handshake
        assert await handle == "real"
        assert client.duplicates == 0 and not client.bad_input.counts
        plain.close()


def test_missing_or_empty_allow_list_refuses_to_start(tmp_path: Path, keys: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(keys, bare)
    shutil.rmtree(bare / "allowed" / "workers")
    sched = zfabric.Scheduler(SchedulerConfig(bind="tcp://127.0.0.1:0", curve=zfabric.CurveConfig(str(bare))))
    with pytest.raises(ConfigError, match="allow-list .* missing or empty"):
        asyncio.run(sched.start())
    asyncio.run(sched.stop())


def test_world_readable_secret_is_refused(tmp_path: Path, keys: Path) -> None:
    loose = tmp_path / "loose"
    shutil.copytree(keys, loose)
    os.chmod(loose / "client.key_secret", 0o644)
    result = subprocess.run(zfabric_cmd("submit", "tcp://127.0.0.1:1", "m:f", "--curve", str(loose),
                                        "--timeout-s", "1"), capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "chmod 600" in result.stderr
