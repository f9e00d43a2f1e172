"""Pickle only where both ends opt in (SPEC section 8): a client's serializer="pickle", a worker's
--accept-pickle. Anywhere else a pickle is refused without being unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import msgpack
import pytest

import zfabric
from zfabric import demo_tasks
from zfabric.errors import ProtocolError
from zfabric.values import PICKLED, PICKLED_ARGS, decode_value, encode_value

from conftest import TASKS, Fabric, start_fabric

pytestmark = pytest.mark.timeout(90)


class _Trap:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


async def test_a_local_fabric_with_pickle_carries_values_outside_the_table() -> None:
    async with zfabric.local(workers=1, app=[TASKS], serializer="pickle") as client:
        value = demo_tasks.Opaque({"nested": [demo_tasks.Opaque(1)], "a set": {1, 2}})
        assert await client.submit(demo_tasks.echo, value) == value
        assert await client.submit(demo_tasks.add, 1, b=2) == 3  # keyword arguments travel pickled too


@pytest.fixture(scope="module")
def plain_fabric() -> Fabric:
    fabric = start_fabric(workers=1)  # workers without --accept-pickle
    yield fabric
    fabric.stop()


async def test_a_worker_without_accept_pickle_refuses_pickled_tasks_unopened(plain_fabric: Fabric,
                                                                            tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    async with zfabric.Client(plain_fabric.address, serializer="pickle") as client:
        with pytest.raises(zfabric.TaskRejected, match="--accept-pickle"):
            await client.submit(demo_tasks.echo, _Trap(str(marker)))
    assert not marker.exists()
    async with zfabric.Client(plain_fabric.address) as client:  # and msgpack clients are served as before
        assert await client.submit(demo_tasks.inc, 1) == 2


def test_a_client_that_did_not_opt_in_refuses_a_pickled_result(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    data = encode_value(_Trap(str(marker)), pickled=True)
    with pytest.raises(ProtocolError, match="did not opt in"):
        decode_value(data)
    args = msgpack.packb(["m:f", [msgpack.ExtType(PICKLED_ARGS, pickle.dumps(((_Trap(str(marker)),), {})))], {}, {}])
    with pytest.raises(ProtocolError):
        decode_value(args)
    assert not marker.exists() and PICKLED != PICKLED_ARGS


def test_serializer_must_be_known() -> None:
    with pytest.raises(zfabric.ConfigError, match="serializer"):
        zfabric.Client("tcp://127.0.0.1:1", serializer="json")


def test_serializer_is_a_client_setting_not_a_task_option() -> None:
    client = zfabric.Client("tcp://127.0.0.1:1")
    with pytest.raises(zfabric.ConfigError, match="setting of the client"):
        client.options(serializer="pickle")
