"""Golden wire vectors: the exact bytes of every message kind (wire version 1), both directions.

Each case is (file under tests/golden/, Kind, fields). The files are the reference for implementations
in other languages and are shown, with their meaning, in docs/PROTOCOL.md. This table is the source of
truth for their content: a change here, or in `zfabric.protocol`, that alters a byte fails this test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zfabric.errors import ProtocolError
from zfabric.protocol import (
    SCHEMA,
    VERSION,
    Kind,
    Status,
    decode,
    decode_call,
    decode_error,
    decode_value,
    encode,
    encode_call,
    encode_error,
    encode_value,
)

GOLDEN = Path(__file__).parent / "golden"

# Fixed example values (in real use the client id is 16 secret random bytes and the epoch 48 random bits).
CLIENT_ID = bytes.fromhex("c1d2e3f4a5b6c7d8e9fa0b1c2d3e4f50")
SINK = "tcp://10.0.0.2:40001"
EPOCH = 0x5A5A01234567
SESSION = 1
TASK1 = 0x1234567800000001
TASK2 = 0x1234567800000002
TASK3 = 0x1234567800000003

CALL = encode_call("myapp.tasks:add", [2, 3], {"scale": 10},
                   {"timeout_s": 30.0, "retries": 2, "retry_on": ["ConnectionError"], "backoff_s": 0.5})
CALL2 = encode_call("myapp.tasks:ping", [], {}, {})
ERROR = encode_error("ValueError", "scale must be positive",
                     "Traceback (most recent call last):\n  ...\nValueError: scale must be positive\n")
VALUE = encode_value(50)

CASES: list[tuple[str, Kind, tuple]] = [
    ("client_hello.bin", Kind.CLIENT_HELLO, (CLIENT_ID, SINK)),
    ("submit.bin", Kind.SUBMIT, (CLIENT_ID, SINK, "", [TASK1, 0, CALL, TASK2, 5, CALL2])),
    ("cancel.bin", Kind.CANCEL, (CLIENT_ID, SINK, [TASK2])),
    ("cancel_to_worker.bin", Kind.CANCEL, (b"", "", [TASK2])),
    ("client_bye.bin", Kind.CLIENT_BYE, (CLIENT_ID, SINK)),
    ("status_request.bin", Kind.STATUS_REQUEST, (SINK,)),
    ("audit.bin", Kind.AUDIT, (CLIENT_ID, SINK, [TASK1, TASK2])),
    ("welcome.bin", Kind.WELCOME, (EPOCH, 0.5)),
    ("accepted.bin", Kind.ACCEPTED, (EPOCH, [TASK1, TASK2])),
    ("rejected.bin", Kind.REJECTED, (EPOCH, [TASK2, "task id already used by another client"])),
    ("heartbeat.bin", Kind.HEARTBEAT, (EPOCH, SESSION, 3)),
    ("heartbeat_to_client.bin", Kind.HEARTBEAT, (EPOCH, 0, 0)),
    ("status_reply.bin", Kind.STATUS_REPLY, ({"epoch": EPOCH, "queued": 0, "running": 1},)),
    ("missing.bin", Kind.MISSING, (EPOCH, [TASK2])),
    ("result.bin", Kind.RESULT, ([TASK1, Status.OK, VALUE, TASK2, Status.ERROR, ERROR],)),
    ("worker_hello.bin", Kind.WORKER_HELLO, ("gpu-box-4242", SESSION, 10000, [], 4242, "gpu-box/10.0.0.3")),
    ("done.bin", Kind.DONE, (SESSION, 4, 3, [TASK1, TASK2], 1, [TASK3, 0.25])),
    ("worker_heartbeat.bin", Kind.WORKER_HEARTBEAT, (SESSION, 4)),
    ("drain.bin", Kind.DRAIN, (SESSION, [TASK3])),
    ("worker_bye.bin", Kind.WORKER_BYE, (SESSION,)),
    ("register.bin", Kind.REGISTER, (EPOCH,)),
    ("dispatch.bin", Kind.DISPATCH, (EPOCH, SESSION, 3, [[SINK, [TASK1, 0, CALL, TASK2, 0, CALL2]]])),
    ("dispatch_isolated.bin", Kind.DISPATCH, (EPOCH, SESSION, 4, [[SINK, [TASK3, 2, CALL2], 1]])),
]

PAYLOADS: list[tuple[str, bytes]] = [("call.bin", CALL), ("error.bin", ERROR)]


def _read(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def test_every_kind_has_a_vector() -> None:
    assert {kind for _, kind, _ in CASES} == set(Kind) == set(SCHEMA)
    assert VERSION == 1
    files = {name for name, _, _ in CASES} | {name for name, _ in PAYLOADS}
    assert files == {p.name for p in GOLDEN.glob("*.bin")}


@pytest.mark.parametrize("name, kind, fields", CASES, ids=[c[0] for c in CASES])
def test_encode_matches_file(name: str, kind: Kind, fields: tuple) -> None:
    assert encode(kind, *fields) == _read(name)


@pytest.mark.parametrize("name, kind, fields", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_fields(name: str, kind: Kind, fields: tuple) -> None:
    got_kind, got_fields = decode(_read(name))
    assert got_kind is kind
    assert got_fields == list(fields)


@pytest.mark.parametrize("name, kind, fields", CASES, ids=[c[0] for c in CASES])
def test_flipped_version_is_refused(name: str, kind: Kind, fields: tuple) -> None:
    data = _read(name)
    # Every envelope here is a fixarray (0x90 | n): the version is the next byte, positive fixint 0x01.
    assert data[0] & 0xF0 == 0x90 and data[1] == VERSION
    for bit in range(8):
        flipped = bytearray(data)
        flipped[1] ^= 1 << bit
        with pytest.raises(ProtocolError):
            decode(bytes(flipped))
    wrong = bytearray(data)
    wrong[1] = 0x02  # the next version
    with pytest.raises(ProtocolError, match="protocol version 2"):
        decode(bytes(wrong))


def test_payload_vectors() -> None:
    assert _read("call.bin") == CALL
    assert decode_call(_read("call.bin")) == (
        "myapp.tasks:add", [2, 3], {"scale": 10},
        {"timeout_s": 30.0, "retries": 2, "retry_on": ["ConnectionError"], "backoff_s": 0.5})
    assert _read("error.bin") == ERROR
    assert decode_error(_read("error.bin")) == (
        "ValueError", "scale must be positive",
        "Traceback (most recent call last):\n  ...\nValueError: scale must be positive\n")
    assert decode_value(VALUE) == 50 and VALUE == b"\x32"
