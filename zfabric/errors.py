"""Exception hierarchy (layer 1: imports nothing from zfabric).

One root, `FabricError`. Failures of a task on a worker surface as `TaskError`
(or a subclass) in the caller; failures of the fabric itself as other
subclasses of the root.
"""

from __future__ import annotations

import asyncio


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
        super().__init__(f"{remote_type}: {remote_message}")

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self):  # keeps the error picklable for users who pass it on
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback, self.task_id))


class TaskTimeout(TaskError, TimeoutError):
    """A task ran longer than its `timeout_s` and was stopped."""


class WorkerLost(TaskError):
    """A task was running on workers that died too many times (a poison task)."""


class TaskRejected(TaskError):
    """The scheduler or worker refused the task (unknown function, not allowed, bad arguments)."""


class TaskCancelled(asyncio.CancelledError):
    """A task was cancelled with `handle.cancel()` (a subclass of `asyncio.CancelledError`)."""
