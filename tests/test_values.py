"""Values keep their type without pickle (SPEC section 8), and hostile encodings of each type are refused."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import pathlib
import struct
import sys
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zfabric
from zfabric import demo_tasks
from zfabric.errors import ProtocolError, SubmitError, TaskError
from zfabric.values import (DATACLASS, ENUM, NDARRAY, PATH, TUPLE, UnsendableValue, classes_of, decode_value,
                            encode_value)

from conftest import TASKS, Fabric, start_fabric

pytestmark = pytest.mark.timeout(120)

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
           | st.binary(max_size=20) | st.complex_numbers(allow_nan=False) | st.decimals(allow_nan=False)
           | st.datetimes() | st.datetimes(timezones=st.timezones()) | st.dates() | st.times() | st.timedeltas()
           | st.uuids() | st.builds(pathlib.PurePosixPath, st.text(max_size=10)) | st.sampled_from(list(demo_tasks.Shade)))
hashables = st.recursive(scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
                         max_leaves=6)
bytearrays = st.binary(max_size=8).map(bytearray)
values = bytearrays | st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner | bytearrays) | st.sets(hashables, max_size=3)
                   | st.dictionaries(hashables, inner, max_size=3)
                   | st.builds(demo_tasks.Point, st.floats(allow_nan=False), st.floats(allow_nan=False), st.text(max_size=5))),
    max_leaves=15)


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same type all the way down (1 == 1.0 == True would hide a lost type)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, dt.datetime) and a.tzinfo is not None:
        return a == b and a.utcoffset() == b.utcoffset()
    if isinstance(a, decimal.Decimal) and a.is_nan():
        return b.is_nan()
    return bool(a == b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_every_value_of_the_table_round_trips_with_its_type(value: Any) -> None:
    assert _same(decode_value(encode_value(value)), value)


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.arange(10.0)[::3], np.asfortranarray(np.eye(3)),
    np.array([], dtype=np.uint8), np.array([1 + 2j], dtype=np.complex64), np.array(["ab", "c"]),
    np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), np.array(np.datetime64("2026-01-01")), np.float32(1.5)],
    ids=lambda a: f"{type(a).__name__}-{a.dtype}-{getattr(a, 'shape', '')}")
def test_numpy_arrays_of_any_plain_dtype_and_layout(array: Any) -> None:
    got = decode_value(encode_value(array))
    assert type(got) is type(array) and got.dtype == array.dtype and np.array_equal(got, array)
    if isinstance(got, np.ndarray):
        assert got.shape == array.shape and got.flags.writeable


def test_big_arrays_are_packed_in_a_buffer_of_their_own_and_arrive_writable() -> None:
    from zfabric.protocol import decode_call
    from zfabric.values import BIG_ARRAY_BYTES, encode_call
    big = np.arange(BIG_ARRAY_BYTES // 8 + 1, dtype=np.float64)
    fortran = np.asfortranarray(np.arange(BIG_ARRAY_BYTES // 4, dtype=np.int32).reshape(512, -1))
    for value in (big, [1, {"x": big}], (big, 2), fortran, np.zeros(BIG_ARRAY_BYTES, dtype="V1")):
        payload = encode_value(value)
        got = decode_value(payload)
        arrays = [(got, value)] if isinstance(value, np.ndarray) else \
            [(got[1]["x"], big)] if isinstance(value, list) else [(got[0], big)]
        for array, sent in arrays:
            assert array.dtype == sent.dtype and array.shape == sent.shape and np.array_equal(array, sent)
            assert array.flags.writeable
    assert type(encode_value(big)) is memoryview and type(encode_value((big, 2))) is bytes  # nested: copied
    name, args, _, _ = decode_call(encode_call("m:f", [big, 1], {}, {}))
    assert np.array_equal(args[0], big) and args[1] == 1
    assert encode_value(1) == b"\x01"  # and the thread's Packer still works after the hand-over


def test_a_bytearray_keeps_its_type_at_the_top_and_in_tuples_and_becomes_bytes_deeper() -> None:
    """The one documented loss: msgpack packs a bytearray as bytes without asking, and walking every list
    to find one would cost as much as packing it."""
    got = decode_value(encode_value((bytearray(b"a"), [bytearray(b"b")], {"k": bytearray(b"c")})))
    assert [type(x) for x in (got[0], got[1][0], got[2]["k"])] == [bytearray, bytes, bytes]


def test_types_outside_the_table_fail_naming_the_type() -> None:
    class Mine:
        pass
    for value, name in [(Mine(), "Mine"), (np.array([object()]), "dtype object"), (lambda: 0, "function"),
                        (type("Sub", (str,), {})("x"), "subclass of str"), ({1: object()}, "object")]:
        with pytest.raises(UnsendableValue, match=name):
            encode_value(value)


def _ext(code: int, data: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, data))


HOSTILE = [
    ("unknown extension code", _ext(99, b"")),
    ("lying tuple length", _ext(TUPLE, b"\xdd\xff\xff\xff\xff")),
    ("tuple of a non-list", _ext(TUPLE, msgpack.packb(5))),
    ("enum outside the allowed modules", _ext(ENUM, msgpack.packb(["os", "PathLike", "x"]))),
    ("enum member that does not exist", _ext(ENUM, msgpack.packb([TASKS, "Shade", "PURPLE"]))),
    ("private name", _ext(ENUM, msgpack.packb([TASKS, "_secret", "x"]))),
    ("dataclass with other fields", _ext(DATACLASS, msgpack.packb([TASKS, "Point", ["x"], [1]]))),
    ("dataclass that is not one", _ext(DATACLASS, msgpack.packb([TASKS, "AppError", [], []]))),
    ("path of an unknown kind", _ext(PATH, msgpack.packb(["PosixPathX", "/"]))),
    ("array of dtype object", _ext(NDARRAY, struct.pack("<I", 5) + msgpack.packb(["|O", [1]]) + b"\x00" * 8)),
    ("array shorter than its shape", _ext(NDARRAY, struct.pack("<I", 9) + msgpack.packb(["<i4", [1000]]) + b"\x00")),
    ("array of negative shape", _ext(NDARRAY, struct.pack("<I", 7) + msgpack.packb(["<i4", [-1]]))),
    ("array header length lying", _ext(NDARRAY, struct.pack("<I", 10**6) + b"\x00")),
    ("unhashable key", msgpack.packb({1: 2}).replace(b"\x01", b"\x91\x01", 1)),
]


@pytest.mark.parametrize("data", [h[1] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_encodings_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_value(data, classes_of([TASKS]))


def test_nested_extension_values_share_one_budget() -> None:
    """A bomb of containers hidden inside extension values is counted like one in plain view."""
    inner = msgpack.packb([[]] * 50_000)
    data = msgpack.packb([msgpack.ExtType(TUPLE, inner)] * 25)  # 1.25 million lists, over the budget
    with pytest.raises(ProtocolError, match="too many"):
        decode_value(data)
    deep = _ext(TUPLE, b"\x90")
    for _ in range(5000):  # each level an extension value holding the next: refused, never a crash
        deep = _ext(TUPLE, b"\x91" + deep)
    with pytest.raises(ProtocolError):
        decode_value(deep)


def test_decoding_imports_nothing_and_builds_only_allowed_classes() -> None:
    assert "zfabric_never_imported" not in sys.modules
    data = _ext(ENUM, msgpack.packb(["zfabric_never_imported", "E", "A"]))
    with pytest.raises(ProtocolError, match="not one this process may build"):
        decode_value(data)
    assert "zfabric_never_imported" not in sys.modules
    point = encode_value(demo_tasks.Point(1.0, 2.0))
    assert decode_value(point, classes_of([TASKS])) == demo_tasks.Point(1.0, 2.0)
    with pytest.raises(ProtocolError):
        decode_value(point, classes_of(["some.other_app"]))  # a worker builds classes of its apps only
    with pytest.raises(ProtocolError):
        decode_value(point, None)


def test_dataclasses_are_built_without_running_their_init() -> None:
    @dataclasses.dataclass
    class Checked:
        n: int

        def __post_init__(self) -> None:
            raise AssertionError("ran")
    obj = object.__new__(Checked)
    object.__setattr__(obj, "n", 3)
    data = encode_value(obj)
    got = decode_value(data, lambda module, qualname: Checked)
    assert type(got) is Checked and got.n == 3


@pytest.fixture(scope="module")
def fabric() -> Fabric:
    fabric = start_fabric(workers=1)
    yield fabric
    fabric.stop()


TYPED = [(1, 2), {3, 4}, frozenset({5}), 2**90, 1.5 + 2j, bytearray(b"ba"), dt.datetime(2026, 12, 2, 13, 30),
         dt.datetime(2026, 12, 2, 13, 30, tzinfo=dt.timezone.utc), dt.date(2026, 12, 2), dt.time(13, 30),
         dt.timedelta(hours=5), decimal.Decimal("0.10"), uuid.UUID(int=7), pathlib.PurePosixPath("/tmp/x"),
         demo_tasks.Shade.DARK, demo_tasks.Point(1.0, 2.0, "p"), {(1, 2): "tuple key", 3: "int key"},
         np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(300_000, dtype=np.int64)]


async def test_typed_values_cross_the_fabric_both_ways(fabric: Fabric) -> None:
    async with zfabric.Client(fabric.address) as client:
        names = await client.submit(f"{TASKS}:type_names", *TYPED, kw=(1,))
        assert names == [type(v).__name__ for v in TYPED] + ["tuple"]
        echoed = await client.map(f"{TASKS}:echo", TYPED)
    for got, sent in zip(echoed, TYPED):
        assert type(got) is type(sent)
        assert np.array_equal(got, sent) if isinstance(sent, np.ndarray) else _same(got, sent), (got, sent)


async def test_unsendable_values_fail_where_they_are_made(fabric: Fabric) -> None:
    class Local:
        pass
    async with zfabric.Client(fabric.address) as client:
        with pytest.raises(SubmitError, match=r"argument 1 \(Local\).*Local"):
            client.submit(f"{TASKS}:echo", 1, Local())
        with pytest.raises(TaskError, match="object"):
            await client.submit(f"{TASKS}:unsendable")
        assert await client.submit(f"{TASKS}:inc", 1) == 2


async def test_dataclasses_of_modules_outside_the_workers_apps_are_refused(fabric: Fabric) -> None:
    @dataclasses.dataclass
    class NotAnApps:
        x: int
    async with zfabric.Client(fabric.address) as client:
        with pytest.raises(zfabric.TaskRejected, match="not one this process may build"):
            await client.submit(f"{TASKS}:echo", NotAnApps(1))
        with pytest.raises(zfabric.TaskRejected):
            await client.submit(f"{TASKS}:echo", enum.Enum("Local", "A").A)


def test_floats_keep_their_edge_values() -> None:
    for value in (math.inf, -math.inf, -0.0, 5e-324):
        assert struct.pack("<d", decode_value(encode_value(value))) == struct.pack("<d", value)


def test_class_lookup_stays_inside_the_named_module_and_imports_nothing() -> None:
    outside = _ext(ENUM, msgpack.packb([TASKS, "asyncio.Future", "x"]))  # demo_tasks imports asyncio
    with pytest.raises(ProtocolError, match="not one this process may build"):
        decode_value(outside, classes_of([TASKS]))
    before = set(sys.modules)
    lazy = _ext(DATACLASS, msgpack.packb(["numpy", "testing.SomeClass", [], []]))  # numpy.__getattr__ imports
    with pytest.raises(ProtocolError):
        decode_value(lazy)
    assert set(sys.modules) == before


def test_a_hash_collision_set_is_refused_at_once() -> None:
    import time
    from zfabric.values import INT, SET
    m = 2**61 - 1
    keys = [msgpack.ExtType(INT, (k * m + 1).to_bytes(16, "big", signed=True)) for k in range(1, 20_001)]
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="distinct hashes"):
        decode_value(_ext(SET, msgpack.packb(keys)))  # all hash to 1: building it took 6.9 s
    assert time.perf_counter() - started < 1.0
    assert len(decode_value(encode_value(set(range(50_000))))) == 50_000


def test_threads_decoding_nested_values_do_not_share_a_depth() -> None:
    import threading
    nested: Any = ()
    for _ in range(40):
        nested = (nested,)
    data = encode_value(nested)
    failures: list[BaseException] = []

    def decode_many() -> None:
        try:
            for _ in range(2000):
                decode_value(data)
        except BaseException as exc:
            failures.append(exc)
    threads = [threading.Thread(target=decode_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
