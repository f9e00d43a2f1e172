"""Exception hierarchy (layer 1: imports nothing from zfabric).

One root, `FabricError`. Failures of a task on a worker surface as `TaskError`
(or a subclass) in the caller; failures of the fabric itself as other
subclasses of the root.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any


class FabricError(Exception):
    """Root of every error zfabric raises."""


class ConfigError(FabricError, ValueError):
    """A component was configured wrongly (bad address, bad option value)."""


class FabricUnreachable(FabricError, ConnectionError):
    """The scheduler did not answer within the configured timeout."""


class ProtocolError(FabricError):
    """A message from the network failed validation (dropped and counted, never raised out of a loop)."""


class SubmitError(FabricError, TypeError):
    """A task could not be submitted (bad function reference, unencodable argument)."""


class TaskError(FabricError):
    """A task failed remotely.

    `remote_type`, `remote_message` and `remote_traceback` carry what the worker saw.
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "",
                 task_id: int | None = None) -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.task_id = task_id
        # not super(): in a class that also subclasses the remote type (`remote_error`), that type's own
        # __init__ may want other arguments
        Exception.__init__(self, f"{remote_type}: {remote_message}")

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self):  # keeps the error picklable for users who pass it on
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback, self.task_id))


def remote_type_name(cls: type) -> str:
    """How a worker names an exception's class: bare for builtins, else ``module.QualName``."""
    module = "__main__" if cls.__module__ == "__mp_main__" else cls.__module__  # a caller's script, in a worker
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


_TYPED: dict[type, type] = {}


def _local_class(type_name: str) -> type | None:
    """The exception class a remote type name names, if this process has it already: only modules already
    imported here are looked in (nothing is imported on a remote peer's word), and only Exception
    subclasses count."""
    if len(type_name) > MAX_TYPE_NAME:
        return None
    parts = type_name.split(".") if "." in type_name else ["builtins", type_name]
    if len(parts) > MAX_TYPE_PARTS:
        return None
    obj: Any = None
    for split in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module: ``pkg.mod.Outer.Inner``
        module = sys.modules.get(".".join(parts[:split]))
        if module is not None:
            obj = module
            for part in parts[split:]:  # vars(), not getattr: a module's __getattr__ may import (numpy's does)
                obj = vars(obj).get(part) if hasattr(obj, "__dict__") else None
            break
    if (isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, FabricError)
            and not issubclass(obj, (StopIteration, StopAsyncIteration))  # raised in a generator: RuntimeError
            and remote_type_name(obj) == type_name):
        return obj
    return None


MAX_TYPE_NAME = 256
MAX_TYPE_PARTS = 16
"""A remote type name longer or more dotted than this is no class of ours (and each prefix costs a lookup)."""


def _rebuild(type_name: str, message: str, traceback_text: str, task_id: int | None) -> TaskError:
    return remote_error(type_name, message, traceback_text, task_id)


def remote_error(type_name: str, message: str, traceback_text: str = "", task_id: int | None = None) -> TaskError:
    """The TaskError for a task that raised ``type_name`` remotely: an instance of a class that subclasses
    both `TaskError` and that type when this process has the type (so ``except ZeroDivisionError`` catches
    it), else a plain `TaskError`."""
    original = _local_class(type_name)
    if original is not None:
        typed = _TYPED.get(original)
        if typed is None:
            try:
                typed = type(original.__name__, (TaskError, original), {
                    "__module__": __name__, "__qualname__": f"TaskError[{type_name}]",
                    "__reduce__": lambda self: (_rebuild, (self.remote_type, self.remote_message,
                                                           self.remote_traceback, self.task_id))})
            except TypeError:  # a layout conflict with TaskError: catchable as TaskError only
                typed = TaskError
            if len(_TYPED) < 1000:
                _TYPED[original] = typed
        try:
            return typed(type_name, message, traceback_text, task_id)  # type: ignore[no-any-return]
        except Exception:  # the original's __new__ wanted other arguments
            pass
    return TaskError(type_name, message, traceback_text, task_id)


class TaskTimeout(TaskError, TimeoutError):
    """A task ran longer than its `timeout_s` and was stopped."""


class WorkerLost(TaskError):
    """A task was running on workers that died too many times (a poison task)."""


class TaskRejected(TaskError):
    """The scheduler or worker refused the task (unknown function, not allowed, bad arguments)."""


class TaskCancelled(asyncio.CancelledError):
    """A task was cancelled with `handle.cancel()` (a subclass of `asyncio.CancelledError`)."""
