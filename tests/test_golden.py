"""Golden wire vectors: the exact bytes of every message kind (wire version 2), both directions.

Each case is (file under tests/golden/, message). The files are the reference for implementations
in other languages and are shown, with their meaning, in docs/PROTOCOL.md. This table is the source of
truth for their content: a change here, or in `zfabric.protocol`, that alters a byte fails this test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zfabric.errors import ProtocolError
from zfabric.protocol import (
    MESSAGES,
    PAYLOAD_FRAME_BYTES,
    SCHEMA,
    VERSION,
    Accepted,
    Audit,
    Cancel,
    ClientBye,
    ClientHello,
    Dispatch,
    Done,
    Events,
    Drain,
    Heartbeat,
    Kind,
    Message,
    Missing,
    Register,
    Rejected,
    Result,
    Status,
    StatusReply,
    StatusRequest,
    Submit,
    Welcome,
    WorkerBye,
    WorkerHeartbeat,
    WorkerHello,
    decode,
    decode_call,
    decode_error,
    decode_value,
    encode,
    encode_call,
    encode_error,
    encode_value,
    payload_of,
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

BIG_CALL = encode_call("myapp.tasks:size", [bytes(PAYLOAD_FRAME_BYTES)], {}, {})
"""A call too large to sit inline: it travels as the payload frame after the envelope (entry ``1``)."""
BIG_VALUE = encode_value(bytes(PAYLOAD_FRAME_BYTES))

CASES: list[tuple[str, Message]] = [
    ("client_hello.bin", ClientHello(CLIENT_ID, SINK)),
    ("submit.bin", Submit(CLIENT_ID, SINK, "", [TASK1, 0, CALL, TASK2, 5, CALL2])),
    ("submit_routed.bin", Submit(CLIENT_ID, SINK, "", [TASK1, [0, ["gpu"], {"gpu": 1}], CALL, TASK2, 5, CALL2])),
    ("submit_with_frame.bin", Submit(CLIENT_ID, SINK, "", [TASK1, 0, CALL, TASK3, 0, 1], (BIG_CALL,))),
    ("cancel.bin", Cancel(CLIENT_ID, SINK, [TASK2])),
    ("cancel_to_worker.bin", Cancel(b"", "", [TASK2])),
    ("client_bye.bin", ClientBye(CLIENT_ID, SINK)),
    ("status_request.bin", StatusRequest(SINK)),
    ("audit.bin", Audit(CLIENT_ID, SINK, [TASK1, TASK2])),
    ("welcome.bin", Welcome(EPOCH, 0.5)),
    ("accepted.bin", Accepted(EPOCH, [TASK1, TASK2])),
    ("rejected.bin", Rejected(EPOCH, [TASK2, "task id already used by another client"])),
    ("heartbeat.bin", Heartbeat(EPOCH, SESSION, 3)),
    ("heartbeat_to_client.bin", Heartbeat(EPOCH, 0, 0)),
    ("status_reply.bin", StatusReply({"epoch": EPOCH, "queued": 0, "running": 1})),
    ("missing.bin", Missing(EPOCH, [TASK2])),
    ("events.bin", Events(42, 1764633600.25, [["submitted", SINK, [TASK1, TASK2]], ["dispatched", "gpu-box-4242", [TASK1]],
                                             ["failed", "gpu-box-4242", [TASK1, "ValueError", "scale must be positive"]],
                                             ["worker-joined", "gpu-box-4242", ["gpu-box", 4242]]])),
    ("done_with_errors.bin", Done(SESSION, 5, 2, [TASK1, TASK2], 1, [], [TASK2, "ValueError", "bad"])),
    ("worker_heartbeat_bad_input.bin", WorkerHeartbeat(SESSION, 4, {"malformed dispatch": 2})),
    ("result.bin", Result([TASK1, Status.OK, VALUE, TASK2, Status.ERROR, ERROR])),
    ("result_with_frame.bin", Result([TASK1, Status.OK, VALUE, TASK3, Status.OK, 1], (BIG_VALUE,))),
    ("worker_hello.bin", WorkerHello("gpu-box-4242", SESSION, 10000, [], 4242, "gpu-box/10.0.0.3")),
    ("worker_hello_routed.bin", WorkerHello("gpu-box-4242", SESSION, 10000, [], 4242, "gpu-box/10.0.0.3",
                                            ["gpu", "eu"], {"gpu": 2, "mem_gb": 64})),
    ("worker_hello_resources_only.bin", WorkerHello("cpu-4243", SESSION, 8, [], 4243, "cpu", [], {"mem_gb": 0.5})),
    ("done.bin", Done(SESSION, 4, 3, [TASK1, TASK2], 1, [TASK3, 0.25])),
    ("worker_heartbeat.bin", WorkerHeartbeat(SESSION, 4)),
    ("drain.bin", Drain(SESSION, [TASK3])),
    ("worker_bye.bin", WorkerBye(SESSION)),
    ("register.bin", Register(EPOCH)),
    ("dispatch.bin", Dispatch(EPOCH, SESSION, 3, [[SINK, [TASK1, 0, CALL, TASK2, 0, CALL2]]])),
    ("dispatch_with_frame.bin", Dispatch(EPOCH, SESSION, 5, [[SINK, [TASK3, 0, 1]]], (BIG_CALL,))),
    ("dispatch_isolated.bin", Dispatch(EPOCH, SESSION, 4, [[SINK, [TASK3, 2, CALL2], 1]])),
]
"""Each file holds the envelope; a message ``..._with_frame`` also has one payload frame after it, whose
bytes are in ``big_call.bin`` (SUBMIT, DISPATCH) or ``big_value.bin`` (RESULT)."""

PAYLOADS: list[tuple[str, bytes]] = [("call.bin", CALL), ("error.bin", ERROR), ("big_call.bin", BIG_CALL),
                                     ("big_value.bin", BIG_VALUE)]


def _read(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def _frames(name: str, message: Message) -> list[bytes]:
    """The message as the files hold it: the envelope, then its payload frames."""
    frames = getattr(message, "frames", ())
    return [_read(name)] + [_read("big_call.bin" if f == BIG_CALL else "big_value.bin") for f in frames]


def test_every_kind_has_a_vector() -> None:
    assert {type(message) for _, message in CASES} == set(MESSAGES.values())
    assert set(MESSAGES) == set(Kind) == set(SCHEMA)
    assert VERSION == 2
    files = {name for name, _ in CASES} | {name for name, _ in PAYLOADS}
    assert files == {p.name for p in GOLDEN.glob("*.bin")}


@pytest.mark.parametrize("name, message", CASES, ids=[c[0] for c in CASES])
def test_encode_matches_files(name: str, message: Message) -> None:
    wire = encode(message)
    assert ([wire] if isinstance(wire, bytes) else wire) == _frames(name, message)


@pytest.mark.parametrize("name, message", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_message(name: str, message: Message) -> None:
    frames = _frames(name, message)
    kind, got = decode(frames[0] if len(frames) == 1 else frames)
    assert type(got) is type(message) and MESSAGES[kind] is type(message)
    assert got == message


def test_payload_frames_are_named_by_number() -> None:
    _, submit = decode(_frames("submit_with_frame.bin", dict(CASES)["submit_with_frame.bin"]))
    tasks, frames = submit.tasks, submit.frames
    used: set[int] = set()
    assert payload_of(tasks[2], frames, used) == CALL and payload_of(tasks[5], frames, used) == BIG_CALL
    assert payload_of(tasks[5], frames, used) is None  # a frame is one task's: never named twice
    assert payload_of(2, frames, set()) is None and payload_of(0, frames, set()) is None
    assert payload_of("x", frames, set()) is None
    with pytest.raises(ProtocolError, match="carries no payload frames"):
        decode([_read("register.bin"), BIG_CALL])


@pytest.mark.parametrize("name, message", CASES, ids=[c[0] for c in CASES])
def test_flipped_version_is_refused(name: str, message: Message) -> None:
    data = _read(name)
    # Every envelope here is a fixarray (0x90 | n): the version is the next byte, positive fixint 0x02.
    assert data[0] & 0xF0 == 0x90 and data[1] == VERSION
    for bit in range(8):
        flipped = bytearray(data)
        flipped[1] ^= 1 << bit
        with pytest.raises(ProtocolError):
            decode(bytes(flipped))
    wrong = bytearray(data)
    wrong[1] = 0x03  # the next version
    with pytest.raises(ProtocolError, match="protocol version 3"):
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


if __name__ == "__main__":  # after a deliberate change of the wire: python tests/test_golden.py
    for old in GOLDEN.glob("*.bin"):
        old.unlink()
    for name, message in CASES:
        wire = encode(message)
        (GOLDEN / name).write_bytes(wire if isinstance(wire, bytes) else wire[0])
    for name, data in PAYLOADS:
        (GOLDEN / name).write_bytes(data)
