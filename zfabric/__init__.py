"""zfabric: a ZeroMQ peer-to-peer task fabric. No broker, no database.

    async with zfabric.local(workers=2, app=["myapp.tasks"]) as client:
        value = await client.submit("myapp.tasks:inc", 1)
        values = await client.map(myapp.tasks.inc, range(1000))
"""

from .client import Client
from .submitter import Submitter
from .config import ClientConfig, CurveConfig, SchedulerConfig, Timing, WorkerConfig
from .errors import (ConfigError, FabricError, FabricUnreachable, ProtocolError, SubmitError, TaskCancelled,
                     TaskError, TaskRejected, TaskTimeout, WorkerLost)
from .executor import Executor
from .handle import Handle, as_completed
from .local import local
from .scheduler import Scheduler
from .sink import Sink
from .syncclient import SyncClient
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Client", "Submitter", "SyncClient", "Executor", "Handle", "as_completed", "local", "Scheduler", "Worker", "Sink",
    "ClientConfig", "CurveConfig", "SchedulerConfig", "WorkerConfig", "Timing",
    "FabricError", "TaskError", "TaskTimeout", "TaskCancelled", "TaskRejected", "WorkerLost", "FabricUnreachable",
    "SubmitError", "ConfigError", "ProtocolError",
]
