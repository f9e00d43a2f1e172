"""Wire protocol: message kinds, encoding, bounded decoding and validation (layer 2).

The rule this module keeps: it does no I/O. Every frame on every socket is
one msgpack array ``[VERSION, KIND, *fields]``; `decode` checks the version,
the kind and the type of every top-level field against `SCHEMA` and raises
`ProtocolError` for anything else, so drivers only ever see well-formed
messages. Task arguments and results travel as opaque msgpack ``bin``
payloads inside the envelope: the scheduler never unpacks them, and one bad
payload fails one task, never a batch.

Batches are flat lists to keep per-task objects few:
SUBMIT carries ``[id, placement, payload, id, placement, payload, ...]`` (a placement is the priority, or
``[priority, tags, resources]`` for a routed task: `routing`),
DISPATCH ``[[sink, [id, tries, payload, ...]], ...]`` (a group ``[sink, [...], 1]`` runs its
tasks isolated in a child process: suspects) and RESULT
``[id, status, value, ...]``.
"""

from __future__ import annotations

import threading
from enum import IntEnum
from typing import Any, NamedTuple, Sequence, get_type_hints, overload

import msgpack

from .errors import ProtocolError
from .values import (ClassLookup, PickledArgs, decode_value, encode_call,  # (re-exported: the payloads' codec)
                     encode_value)

VERSION = 2

MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Largest frame any socket accepts (ZMQ_MAXMSGSIZE); a larger one drops the peer."""
PAYLOAD_FRAME_BYTES = 64 * 1024
"""A payload this large or larger travels in a frame of its own after the envelope."""
MAX_PAYLOAD_FRAMES = 64
"""Most payload frames one message may carry (senders close a batch at `MAX_BATCH_BYTES`: at most 17)."""
MAX_FRAMES = 2 + MAX_PAYLOAD_FRAMES
"""Most frames a message may have: a ROUTER's routing id, the envelope and its payload frames."""
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
    EVENTS = 16           # scheduler -> event subscribers (XPUB): what changed since the last EVENTS
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


Buffer = Any
"""A payload: ``bytes`` inline, or a payload frame as the socket gave it (a ``zmq.Frame``, read through the
buffer protocol). This module never needs to know which."""


# One frozen class per kind (`MESSAGES`): its fields are the envelope's, in order and with their wire types
# (``float`` also accepts an int). A last field ``frames`` holds the message's payload frames, which travel
# after the envelope and are named in it by number (see `payload_of`).

class ClientHello(NamedTuple):
    """client -> scheduler intake: register, and the client's heartbeat (with its bad-input counts, if any)."""
    client_id: bytes
    sink: str
    bad_input: dict = {}


class Submit(NamedTuple):
    """client -> intake: tasks as flat ``[id, placement, payload, ...]`` (`routing.placement`)."""
    client_id: bytes
    sink: str
    results_to: str
    tasks: list
    frames: tuple = ()


class Cancel(NamedTuple):
    """client -> intake (and scheduler -> worker, with empty client id and sink): cancel these ids."""
    client_id: bytes
    sink: str
    ids: list


class ClientBye(NamedTuple):
    """client -> intake: forget me and my tasks."""
    client_id: bytes
    sink: str


class StatusRequest(NamedTuple):
    """anyone -> intake: send a STATUS_REPLY to ``reply_to``."""
    reply_to: str


class Audit(NamedTuple):
    """client -> intake: which of these unfinished ids do you not hold?"""
    client_id: bytes
    sink: str
    ids: list


class Welcome(NamedTuple):
    """scheduler -> client sink: you are registered with this epoch; resubmit what is unfinished."""
    epoch: int
    heartbeat_s: float


class Accepted(NamedTuple):
    """scheduler -> client sink: these ids are queued."""
    epoch: int
    ids: list


class Rejected(NamedTuple):
    """scheduler -> client sink: flat ``[id, reason, ...]``."""
    epoch: int
    reasons: list


class Heartbeat(NamedTuple):
    """scheduler -> worker (session, last DISPATCH seq) and -> client sink (0, 0)."""
    epoch: int
    session: int
    dispatch_seq: int


class StatusReply(NamedTuple):
    """scheduler -> requester."""
    status: dict


class Events(NamedTuple):
    """scheduler -> event subscriber: ``events`` (see `zfabric.events`), numbered from ``first_seq``."""
    first_seq: int
    time: float
    events: list


class Missing(NamedTuple):
    """scheduler -> client sink: these audited ids are not held here."""
    epoch: int
    ids: list


class Result(NamedTuple):
    """worker (or scheduler) -> client sink: flat ``[id, status, payload, ...]``."""
    results: list
    frames: tuple = ()


class WorkerHello(NamedTuple):
    """worker -> scheduler: register a new session with ``free`` slots; ``running`` ids still run here."""
    name: str
    session: int
    free: int
    running: list
    pid: int
    host: str
    tags: list = []  # optional on the wire, as is every field with a default (omitted when empty)
    resources: dict = {}


class Done(NamedTuple):
    """worker -> scheduler: finished ids, ``credit`` slots back, retries as flat ``[id, delay_s, ...]``."""
    session: int
    seq: int
    credit: int
    finished: list
    n_failed: int
    retries: list
    errors: list = []  # flat [id, type name, message, ...] of (at most 100 of) the failed


class WorkerHeartbeat(NamedTuple):
    """worker -> scheduler: alive, the last DONE seq sent (and its bad-input counts, if any)."""
    session: int
    done_seq: int
    bad_input: dict = {}


class Drain(NamedTuple):
    """worker -> scheduler: send no more; these ids were handed back."""
    session: int
    handed_back: list


class WorkerBye(NamedTuple):
    """worker -> scheduler: leaving now."""
    session: int


class Register(NamedTuple):
    """scheduler -> worker: I do not know you, say hello."""
    epoch: int


class Dispatch(NamedTuple):
    """scheduler -> worker: groups ``[sink, [id, tries, payload, ...]]`` (``[sink, [...], 1]``: isolated)."""
    epoch: int
    session: int
    seq: int
    groups: list
    frames: tuple = ()


MESSAGES: dict[Kind, Any] = {
    Kind.CLIENT_HELLO: ClientHello,
    Kind.SUBMIT: Submit,
    Kind.CANCEL: Cancel,
    Kind.CLIENT_BYE: ClientBye,
    Kind.STATUS_REQUEST: StatusRequest,
    Kind.AUDIT: Audit,
    Kind.WELCOME: Welcome,
    Kind.ACCEPTED: Accepted,
    Kind.REJECTED: Rejected,
    Kind.HEARTBEAT: Heartbeat,
    Kind.STATUS_REPLY: StatusReply,
    Kind.MISSING: Missing,
    Kind.EVENTS: Events,
    Kind.RESULT: Result,
    Kind.WORKER_HELLO: WorkerHello,
    Kind.DONE: Done,
    Kind.WORKER_HEARTBEAT: WorkerHeartbeat,
    Kind.DRAIN: Drain,
    Kind.WORKER_BYE: WorkerBye,
    Kind.REGISTER: Register,
    Kind.DISPATCH: Dispatch,
}
_KIND_OF = {cls: kind for kind, cls in MESSAGES.items()}


def _wire_types(cls: Any) -> tuple[Any, ...]:
    hints = get_type_hints(cls)
    return tuple((int, float) if hints[f] is float else hints[f] for f in cls._fields if f != "frames")


SCHEMA: dict[Kind, tuple[Any, ...]] = {kind: _wire_types(cls) for kind, cls in MESSAGES.items()}
"""The envelope's fields of each kind, as the types each may have (derived from the classes)."""
_CARRIES_FRAMES = frozenset(kind for kind, cls in MESSAGES.items() if cls._fields[-1] == "frames")
_OPTIONAL = {kind: len(cls._field_defaults) for kind, cls in MESSAGES.items()
             if kind not in _CARRIES_FRAMES and cls._field_defaults}
"""Kinds whose last fields may be left out (they are, when empty): older senders omit them."""
Frameless = (ClientHello | Cancel | ClientBye | StatusRequest | Audit | Welcome | Accepted | Rejected | Heartbeat
             | StatusReply | Events | Missing | WorkerHello | Done | WorkerHeartbeat | Drain | WorkerBye | Register)
Message = Frameless | Submit | Result | Dispatch

_KINDS = {int(k): k for k in Kind}

_local = threading.local()


def _packer() -> msgpack.Packer:
    """A Packer per thread: reusing one is ~3x cheaper than `packb`, and Packers are not thread-safe."""
    try:
        return _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
        return packer


Wire = bytes | list[Any]
"""An encoded message: its envelope frame alone, or ``[envelope, *payload frames]``."""


@overload
def encode(message: Frameless) -> bytes: ...
@overload
def encode(message: Submit | Result | Dispatch) -> Wire: ...
def encode(message: Message) -> Wire:
    """Encode one message: its envelope frame, or (with payload frames) ``[envelope, *frames]``."""
    kind = _KIND_OF[type(message)]
    fields: list[Any] = list(message)
    if kind in _CARRIES_FRAMES:
        frames: tuple[Any, ...] = fields.pop()
        header = _packer().pack([VERSION, kind, *fields])
        return [header, *frames] if frames else header
    if kind in _OPTIONAL:
        required = len(fields) - _OPTIONAL[kind]
        while len(fields) > required and not fields[-1]:
            fields.pop()
    return _packer().pack([VERSION, kind, *fields])


def encode_fields(kind: Kind, *fields: Any, frames: Sequence[Any] = ()) -> bytes | list[Any]:
    """Encode a message field by field, unchecked: for tests and tools that forge or replay messages."""
    header = _packer().pack([VERSION, kind, *fields])
    return [header, *frames] if frames else header


def attach(payload: Buffer, frames: list[Any]) -> Any:
    """How an entry names ``payload``: inline if small, else as the number of a frame of its own (appended
    to ``frames``), so that no process copies it into or out of an envelope."""
    if type(payload) is bytes and len(payload) < PAYLOAD_FRAME_BYTES:
        return payload
    frames.append(payload)
    return len(frames)


def payload_of(ref: Any, frames: Sequence[Any], used: set[int]) -> Buffer | None:
    """The payload an entry names: inline ``bin``, or payload frame ``ref`` (1 = the first frame after the
    envelope); None if it names neither, or a frame another entry of the message named already (one frame
    named by 50,000 entries would make the fabric carry 50,000 copies). ``used``: one set per message."""
    if type(ref) is bytes:
        return ref
    if type(ref) is int and 0 < ref <= len(frames) and ref not in used:
        used.add(ref)
        return frames[ref - 1]
    return None


ENVELOPE_CONTAINERS = 10_000
"""Arrays and maps one envelope may hold in all (a real one holds a handful: batches are flat)..."""
STATUS_CONTAINERS = 100_000
"""...but a STATUS_REPLY holds a map per worker and client (and a few more for tagged ones)."""


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


def decode(message: bytes | Sequence[Any], *, expect: Sequence[Kind] | None = None) -> tuple[Kind, Any]:
    """Decode and validate one message (an envelope frame, or ``[envelope, *payload frames]``) into its
    class; raise `ProtocolError` saying what was wrong. Payload frames are kept as given, never copied."""
    frame: Any
    if isinstance(message, (bytes, bytearray, memoryview)):
        frame, frames = message, ()
    else:
        frame, frames = message[0], tuple(message[1:])
    # A status reply is [2, 14, {...}]: its third byte names its kind before anything is decoded.
    budget = _ContainerBudget(STATUS_CONTAINERS if len(frame) > 2 and frame[2] == Kind.STATUS_REPLY
                              else ENVELOPE_CONTAINERS)
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
        least = len(schema) - _OPTIONAL.get(kind, 0)
        if not least <= len(fields) < len(schema):
            raise ProtocolError(f"{kind.name} has {len(fields)} fields, expected "
                                + (f"{least} to {len(schema)}" if least < len(schema) else f"{len(schema)}"))
    for i, (value, typ) in enumerate(zip(fields, schema)):
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ProtocolError(f"{kind.name} field {i} is {type(value).__name__}")
    if kind in _CARRIES_FRAMES:
        if len(frames) > MAX_PAYLOAD_FRAMES:
            raise ProtocolError(f"{kind.name} has {len(frames)} payload frames (limit {MAX_PAYLOAD_FRAMES})")
        return kind, MESSAGES[kind](*fields, frames)
    if frames:
        raise ProtocolError(f"{kind.name} carries no payload frames, got {len(frames)}")
    return kind, MESSAGES[kind]._make(fields) if len(fields) == len(schema) else MESSAGES[kind](*fields)


# ---- payloads: the opaque bin values carried inside envelopes ------------------------------

def decode_call(payload: Any, lookup: ClassLookup | None = None,
                accept_pickle: bool = False) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
    """Decode and validate a task call; raises ProtocolError saying what is wrong. ``lookup``: the classes
    of enums and dataclasses the arguments may hold (a worker's app modules); ``accept_pickle``: whether
    pickled arguments are unpickled (else such a call is refused)."""
    call = decode_value(payload, lookup, accept_pickle)
    if type(call) is list and len(call) == 4 and type(call[1]) is list and len(call[1]) == 1 \
            and type(call[1][0]) is PickledArgs and call[2] == {}:
        call[1], call[2] = call[1][0].args, call[1][0].kwargs
    if (type(call) is not list or len(call) != 4 or type(call[0]) is not str
            or type(call[1]) is not list or type(call[2]) is not dict or type(call[3]) is not dict
            or (call[2] and not all(type(key) is str for key in call[2]))):
        raise ProtocolError("task payload is not [function, args, kwargs with str keys, options]")
    return call[0], call[1], call[2], call[3]


def encode_error(type_name: str, message: str, traceback_text: str = "") -> bytes:
    return _packer().pack([type_name, message, traceback_text])


def decode_error(data: Any) -> tuple[str, str, str]:
    err = decode_value(data, None)
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
