"""The wire codec without sockets: one table drives encode and decode, bad frames are refused."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zfabric.errors import ProtocolError
from zfabric.protocol import (MESSAGES, SCHEMA, VERSION, Kind, Status, decode, decode_call, decode_error, decode_value,
                              describe_unencodable, encode_fields, encode_call, encode_error, encode_value)

pytestmark = pytest.mark.timeout(60)

VALID = {
    Kind.CLIENT_HELLO: (b"\x01" * 8, "tcp://127.0.0.1:5000"),
    Kind.SUBMIT: (b"\x01" * 8, "tcp://127.0.0.1:5000", "", [1, 0, b"payload", 2, 5, b"p2"]),
    Kind.CANCEL: (b"\x01" * 8, "tcp://127.0.0.1:5000", [1, 2, 3]),
    Kind.CLIENT_BYE: (b"\x01" * 8, "tcp://127.0.0.1:5000"),
    Kind.STATUS_REQUEST: ("tcp://127.0.0.1:5001",),
    Kind.AUDIT: (b"\x01" * 8, "tcp://127.0.0.1:5000", [1, 2]),
    Kind.MISSING: (123456, [2]),
    Kind.EVENTS: (7, 1.5, [["done", "w", [1, 2]]]),
    Kind.WELCOME: (123456, 0.5),
    Kind.ACCEPTED: (123456, [1, 2]),
    Kind.REJECTED: (123456, [1, "why"]),
    Kind.HEARTBEAT: (123456, 3, 17),
    Kind.STATUS_REPLY: ({"workers": []},),
    Kind.RESULT: ([1, Status.OK, b"\x01"],),
    Kind.WORKER_HELLO: ("w1", 1, 100, [5, 6], 4242, "host"),
    Kind.DONE: (1, 7, 3, [1, 2, 3], 1, [4, 0.25]),
    Kind.WORKER_HEARTBEAT: (1, 7),
    Kind.DRAIN: (1, [9]),
    Kind.WORKER_BYE: (1,),
    Kind.REGISTER: (123456,),
    Kind.DISPATCH: (123456, 1, 1, [["tcp://127.0.0.1:5000", [1, 0, b"payload"]]]),
}


def test_table_covers_every_kind() -> None:
    assert set(VALID) == set(Kind) == set(SCHEMA)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_round_trip(kind: Kind) -> None:
    decoded_kind, fields = decode(encode_fields(kind, *VALID[kind]))
    assert decoded_kind is kind
    assert fields == MESSAGES[kind](*VALID[kind])


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_missing_field_is_refused(kind: Kind) -> None:
    with pytest.raises(ProtocolError, match="fields"):
        decode(encode_fields(kind, *VALID[kind][:-1]))


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_wrong_field_type_is_refused(kind: Kind) -> None:
    fields = list(VALID[kind])
    fields[0] = {"not": "right"} if not isinstance(fields[0], dict) else 1
    with pytest.raises(ProtocolError, match="field 0"):
        decode(encode_fields(kind, *fields))


@pytest.mark.parametrize("frame, message", [
    (b"", "undecodable"),
    (b"\xc1", "undecodable"),
    (msgpack.packb({"a": 1}), "not a"),
    (msgpack.packb([VERSION]), "not a"),
    (msgpack.packb([VERSION + 1, Kind.HEARTBEAT, 1, 1, 1]), "version"),
    (msgpack.packb([VERSION, 99]), "unknown message kind"),
    (msgpack.packb([VERSION, "HEARTBEAT"]), "unknown message kind"),
    (msgpack.packb([VERSION, Kind.HEARTBEAT, True, 1, 1]), "field 0"),
    (msgpack.packb([VERSION, Kind.STATUS_REPLY, {1: 2}]), "undecodable"),  # strict_map_key
    (b"\x91" * 100_000 + b"\x90", "undecodable"),  # deep nesting
    (msgpack.packb([VERSION, Kind.ACCEPTED, 1, list(range(200_000))]), "undecodable"),  # over the array limit
    (b"\x93\x01\x0b\xdd\xff\xff\xff\xff", "undecodable"),  # array header claims 4 G items
    (msgpack.packb([VERSION, Kind.RESULT, [msgpack.ExtType(1, b"x")]]), "undecodable"),  # ext types refused
])
def test_bad_frames_are_refused(frame: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(frame)


def test_expect_limits_kinds() -> None:
    with pytest.raises(ProtocolError, match="unexpected"):
        decode(encode_fields(Kind.REGISTER, 1), expect=(Kind.DISPATCH,))


def test_call_round_trip_keeps_bytes() -> None:
    payload = encode_call("m:f", [b"\x00\xff", "text", 1.5, None, [1, 2]], {"k": b"v"}, {"timeout_s": 2})
    assert decode_call(payload) == ("m:f", [b"\x00\xff", "text", 1.5, None, [1, 2]], {"k": b"v"}, {"timeout_s": 2})


@pytest.mark.parametrize("payload", [
    encode_value("not a list"), encode_value([1, [], {}, {}]), encode_value(["m:f", [], {}]), b"\xc1"])
def test_bad_call_is_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_call(payload)


def test_error_round_trip() -> None:
    assert decode_error(encode_error("ValueError", "x", "tb")) == ("ValueError", "x", "tb")
    with pytest.raises(ProtocolError):
        decode_error(encode_value([1, 2, 3]))


def test_describe_unencodable_names_the_argument() -> None:
    assert "argument 1 (object)" in describe_unencodable([1, object()], {})
    assert "keyword argument 'f' (function)" in describe_unencodable([1], {"f": lambda: 0})


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(values)
def test_values_round_trip(value: object) -> None:
    assert decode_value(encode_value(value)) == value


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass
