"""A standalone result sink for fire-and-forget pipelines (layer 4).

The rule it keeps: it only listens. Workers push RESULT batches to it; it
writes one JSON line per result and drops a second result for a task id it
has already written (at-least-once execution, exactly one line per task).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import IO, Any

import zmq

from . import transport
from .errors import ConfigError, ProtocolError
from .protocol import Kind, Status, decode_error, decode_value, payload_of
from .config import CurveConfig
from .security import Curve
from .service import Service

log = logging.getLogger(__name__)

_SINK_KINDS = (Kind.RESULT, Kind.WELCOME, Kind.ACCEPTED, Kind.HEARTBEAT, Kind.REJECTED, Kind.MISSING)


def to_json(value: Any) -> Any:
    """JSON form of a msgpack value: bytes become {"base64": ...}."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


class Sink(Service):
    """Binds a PULL socket at `bind` and writes results as JSON lines to `out`."""

    def __init__(self, bind: str, out: IO[str], seen_limit: int = 10_000_000,
                 curve: CurveConfig | None = None) -> None:
        super().__init__()
        self.bind = bind
        self.curve = curve
        self.out = out
        self.written = 0
        self.duplicates = 0
        self.bad_input = transport.BadInput("sink")
        self._seen: set[int] = set()
        self._seen_limit = seen_limit

    async def start(self) -> "Sink":
        self._sock = transport.make_socket(zmq.PULL, connect=False)
        curve = Curve(self.curve, "client") if self.curve is not None else None
        if curve is not None:
            curve.serve(self._sock, "fabric")
        try:
            self._sock.bind(self.bind)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise ConfigError(f"cannot listen on {self.bind}: {exc}") from None
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if curve is not None:
            self.address = curve.sink_address(self.address)
        self._tasks = [asyncio.create_task(transport.Reader(self._sock, self._on_batch, "sink", self.bad_input).run(self._stop))]
        return self

    async def stop(self) -> None:
        await self._end_tasks()
        self._sock.close()
        self.out.flush()

    def _on_batch(self, batch: list[list[Any]]) -> None:
        for _, kind, fields in transport.messages(batch, _SINK_KINDS, self.bad_input, "sink"):
            if kind == Kind.RESULT:
                self._write(fields.results, fields.frames)
        self.out.flush()

    def _write(self, flat: list[Any], frames: tuple[Any, ...]) -> None:
        used: set[int] = set()
        for i in range(0, len(flat) - 2, 3):
            task_id, status, data = flat[i], flat[i + 1], payload_of(flat[i + 2], frames, used)
            if type(task_id) is not int or type(status) is not int or data is None:
                self.bad_input("malformed result", "", "not [id, status, value]")
                continue
            if task_id in self._seen:
                self.duplicates += 1
                continue
            if len(self._seen) < self._seen_limit:
                self._seen.add(task_id)
            record: dict[str, Any] = {"id": task_id, "status": Status(status).name.lower()
                                      if status in Status._value2member_map_ else status}
            try:
                if status == Status.OK:
                    record["value"] = to_json(decode_value(data))
                else:
                    record["error"] = dict(zip(("type", "message", "traceback"), decode_error(data)))
            except ProtocolError as exc:
                record["error"] = {"type": "ProtocolError", "message": str(exc)}
            self.out.write(json.dumps(record) + "\n")
            self.written += 1
