"""A task's exception reaches the caller as a TaskError that is also an instance of its own type, when the
caller has that type (builtins, the stdlib, the app's modules): `except ZeroDivisionError` catches it."""

from __future__ import annotations

import json
import pickle
import sys

import pytest

import zfabric
from zfabric import demo_tasks
from zfabric.errors import remote_error

from conftest import TASKS, Fabric, start_fabric

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def fabric() -> Fabric:
    fabric = start_fabric(workers=1)
    yield fabric
    fabric.stop()


@pytest.mark.parametrize("kind, expected, remote_type", [
    ("zero", ZeroDivisionError, "ZeroDivisionError"),
    ("json", json.JSONDecodeError, "json.decoder.JSONDecodeError"),
    ("file", FileNotFoundError, "FileNotFoundError"),
    ("app", demo_tasks.AppError, "zfabric.demo_tasks.AppError"),
    ("other", KeyError, "KeyError"),
])
async def test_remote_exceptions_keep_their_type(fabric: Fabric, kind: str, expected: type,
                                                 remote_type: str) -> None:
    async with zfabric.Client(fabric.address) as client:
        with pytest.raises(expected) as info:
            await client.submit(f"{TASKS}:raise_kind", kind)
    error = info.value
    assert isinstance(error, zfabric.TaskError) and error.remote_type == remote_type
    assert "raise_kind" in error.remote_traceback  # the remote traceback is kept
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, expected) and isinstance(again, zfabric.TaskError) and str(again) == str(error)


async def test_a_task_raising_system_exit_fails_only_itself(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        with pytest.raises(zfabric.TaskError, match="SystemExit"):
            await client.submit(f"{TASKS}:raise_kind", "exit")
        assert await client.submit(f"{TASKS}:inc", 1) == 2


def test_types_this_process_lacks_or_that_are_not_exceptions_give_a_plain_task_error() -> None:
    assert "zfabric_no_such_module" not in sys.modules
    for name in ("zfabric_no_such_module.Error", "os.system", "os.path", "SystemExit", "KeyboardInterrupt",
                 "zfabric.errors.ConfigError", "builtins.ZeroDivisionError", "", ".", "a..b", "ZeroDivisionError.x"):
        error = remote_error(name, "m")
        assert type(error) is zfabric.TaskError, name
    assert "zfabric_no_such_module" not in sys.modules  # nothing is imported on a remote peer's word


async def test_a_remote_stop_iteration_is_a_plain_task_error(fabric: Fabric) -> None:
    """A StopIteration subclass raised through `await` (or a generator) would turn into RuntimeError."""
    async with zfabric.Client(fabric.address) as client:
        with pytest.raises(zfabric.TaskError, match="StopIteration") as info:
            await client.submit(f"{TASKS}:raise_kind", "stop")
    assert not isinstance(info.value, StopIteration)


def test_a_long_dotted_remote_type_name_costs_nothing() -> None:
    import time
    started = time.perf_counter()
    error = remote_error("a." * 40_000 + "b", "m")  # each prefix was a lookup: 14.5 s
    assert type(error) is zfabric.TaskError and time.perf_counter() - started < 0.1


def test_a_remote_type_name_never_makes_a_module_import() -> None:
    import numpy  # noqa: F401  (its module __getattr__ imports submodules on attribute access)
    before = set(sys.modules)
    for name in ("numpy.polynomial.PolyError", "numpy.f2py.Error", "numpy.testing.Error"):
        remote_error(name, "m")
    assert set(sys.modules) == before
