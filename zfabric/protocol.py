"""Wire protocol: message kinds, encoding, bounded decoding and validation (layer 2).

The rule this module keeps: it does no I/O. Every frame on every socket is
one msgpack array ``[VERSION, KIND, *fields]``; `decode` checks the version,
the kind and the type of every top-level field against `SCHEMA` and raises
`ProtocolError` for anything else, so drivers only ever see well-formed
messages. Task arguments and results travel as opaque msgpack ``bin``
payloads inside the envelope: the scheduler never unpacks them, and one bad
payload fails one task, never a batch.

Batches are flat lists to keep per-task objects few:
SUBMIT carries ``[id, priority, payload, id, priority, payload, ...]``,
DISPATCH ``[[sink, [id, tries, payload, ...]], ...]`` (a group ``[sink, [...], 1]`` runs its
tasks isolated in a child process: suspects) and RESULT
``[id, status, value, ...]``.
"""

from __future__ import annotations

import threading
from enum import IntEnum
from typing import Any, Sequence

import msgpack

from .errors import ProtocolError

VERSION = 1

MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Largest frame any socket accepts (ZMQ_MAXMSGSIZE); a larger one drops the peer."""
MAX_FRAMES = 4
"""Most frames a message may have (the ROUTER's routing id plus the body)."""
MAX_BATCH_ITEMS = 3 * 50_000
"""Longest flat batch list in one envelope."""
MAX_BATCH_BYTES = 1024 * 1024
"""Senders close a batch frame once its payloads pass this size..."""
MAX_BATCH_TASKS = 1000
"""...or once it holds this many tasks, so the next process starts while this one is still packing."""


class Kind(IntEnum):
    """Message kinds. Direction is in the comment; fields are in `SCHEMA`."""

    CLIENT_HELLO = 1      # client -> scheduler: also the client's heartbeat
    SUBMIT = 2            # client -> scheduler
    CANCEL = 3            # client -> scheduler, scheduler -> worker
    CLIENT_BYE = 4        # client -> scheduler: forget me and my tasks
    STATUS_REQUEST = 5    # anyone -> scheduler intake
    AUDIT = 6             # client -> scheduler: which of these unfinished tasks do you not hold?
    WELCOME = 10          # scheduler -> client: you are registered (resubmit what is unfinished)
    ACCEPTED = 11         # scheduler -> client
    REJECTED = 12         # scheduler -> client
    HEARTBEAT = 13        # scheduler -> client and worker
    STATUS_REPLY = 14     # scheduler -> requester
    MISSING = 15          # scheduler -> client: these audited tasks are not held here
    RESULT = 20           # worker (or scheduler) -> client sink
    WORKER_HELLO = 30     # worker -> scheduler: register, with free slots (credit)
    DONE = 32             # worker -> scheduler: finished ids, credit back, retries
    WORKER_HEARTBEAT = 33  # worker -> scheduler
    DRAIN = 34            # worker -> scheduler: take no more work; here are tasks handed back
    WORKER_BYE = 35       # worker -> scheduler: leaving now
    REGISTER = 40         # scheduler -> worker: I do not know you, say hello
    DISPATCH = 41         # scheduler -> worker


class Status(IntEnum):
    """Outcome of a task in a RESULT."""

    OK = 0
    ERROR = 1
    TIMEOUT = 2
    CANCELLED = 3
    LOST = 4
    REJECTED = 5


_int = int
_num = (int, float)
SCHEMA: dict[int, tuple[Any, ...]] = {
    Kind.CLIENT_HELLO: (bytes, str),                      # client_id, sink
    Kind.SUBMIT: (bytes, str, str, list),                 # client_id, sink, results_to, flat [id, prio, payload]*
    Kind.CANCEL: (bytes, str, list),                      # client_id (or b""), sink (or ""), [id]*
    Kind.CLIENT_BYE: (bytes, str),                        # client_id, sink
    Kind.STATUS_REQUEST: (str,),                          # reply_to
    Kind.AUDIT: (bytes, str, list),                       # client_id, sink, [id]*
    Kind.WELCOME: (_int, _num),                           # epoch, heartbeat_s
    Kind.ACCEPTED: (_int, list),                          # epoch, [id]*
    Kind.REJECTED: (_int, list),                          # epoch, flat [id, reason]*
    Kind.HEARTBEAT: (_int, _int, _int),                   # epoch, session, last dispatch seq (0, 0 to clients)
    Kind.STATUS_REPLY: (dict,),
    Kind.MISSING: (_int, list),                           # epoch, [id]*
    Kind.RESULT: (list,),                                 # flat [id, status, value_bytes]*
    Kind.WORKER_HELLO: (str, _int, _int, list, _int, str),  # name, session, free, running ids, pid, host
    Kind.DONE: (_int, _int, _int, list, _int, list),      # session, seq, credit, finished ids, n_failed, flat [id, delay_s]*
    Kind.WORKER_HEARTBEAT: (_int, _int),                  # session, last DONE seq sent
    Kind.DRAIN: (_int, list),                             # session, [id handed back]*
    Kind.WORKER_BYE: (_int,),                             # session
    Kind.REGISTER: (_int,),                               # epoch
    Kind.DISPATCH: (_int, _int, _int, list),              # epoch, session, seq, [[sink, [id, tries, payload]*, (1)]]*
}

_KINDS = {int(k): k for k in Kind}

_local = threading.local()


def _packer() -> msgpack.Packer:
    """A Packer per thread: reusing one is ~3x cheaper than `packb`, and Packers are not thread-safe."""
    try:
        return _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
        return packer


def encode(kind: Kind, *fields: Any) -> bytes:
    """Encode one message."""
    return _packer().pack([VERSION, kind, *fields])


ENVELOPE_CONTAINERS = 10_000
"""Arrays and maps one envelope may hold in all (a real one holds a handful: batches are flat)."""
PAYLOAD_CONTAINERS = 1_000_000
"""Arrays and maps one task payload may hold in all."""


class _ContainerBudget:
    """A list/object hook that refuses input holding too many containers in all.

    Per-array length limits do not stop a wide bomb: a megabyte of one-byte
    empty arrays becomes ~66 MB of Python lists. Counting every container does.
    """

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ValueError("too many arrays and maps in one message")
        return obj


def _short(value: Any) -> str:
    """A bounded repr of untrusted input, for error messages and logs."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode(frame: bytes, *, expect: Sequence[Kind] | None = None) -> tuple[Kind, list[Any]]:
    """Decode and validate one envelope; raise `ProtocolError` saying what was wrong."""
    budget = _ContainerBudget(ENVELOPE_CONTAINERS)
    try:
        msg = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True,
            max_str_len=64 * 1024, max_bin_len=MAX_FRAME_BYTES, max_array_len=MAX_BATCH_ITEMS,
            max_map_len=256, max_ext_len=0, list_hook=budget, object_hook=budget)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable frame ({type(exc).__name__}: {_short(str(exc))})") from None
    if type(msg) is not list or len(msg) < 2:
        raise ProtocolError("frame is not a [version, kind, ...] array")
    if type(msg[0]) is not int or msg[0] != VERSION:  # msgpack true and 1.0 compare equal to 1
        raise ProtocolError(f"protocol version {_short(msg[0])}, expected {VERSION}")
    kind = _KINDS.get(msg[1]) if type(msg[1]) is int else None
    if kind is None:
        raise ProtocolError(f"unknown message kind {_short(msg[1])}")
    if expect is not None and kind not in expect:
        raise ProtocolError(f"unexpected message kind {kind.name} here")
    fields = msg[2:]
    schema = SCHEMA[kind]
    if len(fields) != len(schema):
        raise ProtocolError(f"{kind.name} has {len(fields)} fields, expected {len(schema)}")
    for i, (value, typ) in enumerate(zip(fields, schema)):
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ProtocolError(f"{kind.name} field {i} is {type(value).__name__}")
    return kind, fields


# ---- payloads: the opaque bin values carried inside envelopes ------------------------------

def encode_value(value: Any) -> bytes:
    """Encode a user value (argument list or result); raises TypeError/ValueError if msgpack cannot."""
    return _packer().pack(value)


def decode_value(data: bytes) -> Any:
    """Decode a user value; raises ProtocolError.

    msgpack's own defaults bound every length by the size of `data` (so a lying
    header is refused), keys must be str or bytes and strings are UTF-8; only
    ext types need refusing here. Per-task decoding is hot: no further kwargs.
    """
    try:
        if len(data) <= 4096:  # too small to expand much: skip the (per-container) budget on the hot path
            return msgpack.unpackb(data, max_ext_len=0)
        return msgpack.unpackb(data, max_ext_len=0, list_hook=_ContainerBudget(PAYLOAD_CONTAINERS),
                               object_hook=_ContainerBudget(PAYLOAD_CONTAINERS))
    except Exception as exc:
        raise ProtocolError(f"undecodable value ({type(exc).__name__}: {_short(str(exc))})") from None


def encode_call(function: str, args: Sequence[Any], kwargs: dict[str, Any], options: dict[str, Any]) -> bytes:
    """Encode a task call: ``[function, args, kwargs, options]``."""
    return _packer().pack([function, args, kwargs, options])


def decode_call(payload: bytes) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
    """Decode and validate a task call; raises ProtocolError saying what is wrong."""
    call = decode_value(payload)
    if (type(call) is not list or len(call) != 4 or type(call[0]) is not str
            or type(call[1]) is not list or type(call[2]) is not dict or type(call[3]) is not dict):
        raise ProtocolError("task payload is not [function, args, kwargs, options]")
    return call[0], call[1], call[2], call[3]


def encode_error(type_name: str, message: str, traceback_text: str = "") -> bytes:
    return _packer().pack([type_name, message, traceback_text])


def decode_error(data: bytes) -> tuple[str, str, str]:
    err = decode_value(data)
    if type(err) is not list or len(err) != 3 or not all(type(x) is str for x in err):
        raise ProtocolError("error payload is not [type, message, traceback]")
    return err[0], err[1], err[2]


def describe_unencodable(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """Name the first argument msgpack cannot encode, for a useful error at submit."""
    for i, arg in enumerate(args):
        try:
            encode_value(arg)
        except Exception as exc:
            return f"argument {i} ({type(arg).__name__}) cannot be sent: {exc}"
    for key, arg in kwargs.items():
        if type(key) is not str:
            return f"keyword {key!r} is not a str"
        try:
            encode_value(arg)
        except Exception as exc:
            return f"keyword argument {key!r} ({type(arg).__name__}) cannot be sent: {exc}"
    return "arguments cannot be encoded with msgpack"
