"""Entry point of a child process that runs a worker's isolated tasks: timed sync ones, and suspects (see `isolation`)."""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys

import msgpack

from .execution import call_sync, error_entry
from .errors import ProtocolError
from .protocol import Status, decode_call
from .values import classes_of
from .registry import NotAllowed, Registry
from .runtime import die_with_parent

_LEN = struct.Struct("!I")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m zfabric.child")
    parser.add_argument("--app", action="append", default=[])
    parser.add_argument("--accept-pickle", action="store_true")
    parsed = parser.parse_args()
    registry = Registry(parsed.app)
    classes = classes_of(registry.module)
    die_with_parent()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(_LEN.size)
        if len(header) < _LEN.size:
            return
        payload, tries = msgpack.unpackb(stdin.read(_LEN.unpack(header)[0]), raw=False)
        try:
            name, args, kwargs, options = decode_call(payload, classes, parsed.accept_pickle)
            fn = registry.resolve(name)
            if registry.is_async(fn):
                coroutine_fn = fn
                fn = lambda *a, **k: asyncio.run(coroutine_fn(*a, **k))  # noqa: E731
            outcome = call_sync(fn, args, kwargs, options, tries)
        except (NotAllowed, ProtocolError) as exc:
            outcome = (Status.REJECTED, error_entry(exc)[1], None)
        reply = msgpack.packb(list(outcome), use_bin_type=True)
        stdout.write(_LEN.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    main()
