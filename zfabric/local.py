"""`zfabric.local`: a whole fabric on loopback for one `async with` (layer 5).

The rule it keeps: nothing outlives the block. The scheduler and workers are
child processes of a `Supervisor`; leaving the block closes the client and
stops them all (and they die with this process if it is killed).
"""

from __future__ import annotations

from typing import Any, Iterable

from .client import Client
from .config import CurveConfig
from .supervisor import Supervisor


class local:  # noqa: N801 - used like a function: `async with zfabric.local(...) as client`
    """Start a scheduler and `workers` worker processes on 127.0.0.1 and yield a connected `Client`.

    ``app`` lists the modules the workers may run functions from. Other
    keyword arguments are client options (`ClientConfig`).
    """

    def __init__(self, workers: int = 2, app: Iterable[str] | str = (), *, concurrency: int | None = None,
                 threads: int | None = None, port: int = 0, host: str = "127.0.0.1", log_level: str = "warning",
                 curve: CurveConfig | None = None, **client_options: Any) -> None:
        apps = [app] if isinstance(app, str) else list(app)
        worker_args = [arg for name in apps for arg in ("--app", name)]
        if concurrency is not None:
            worker_args += ["--concurrency", str(concurrency)]
        if threads is not None:
            worker_args += ["--threads", str(threads)]
        curve_args = ["--curve", curve.keys_dir] if curve is not None else []
        self.supervisor = Supervisor(["--bind", f"tcp://{host}:{port}", *curve_args], worker_args + curve_args,
                                     workers, log_level)
        self._client_options = dict(client_options, curve=curve)
        self.client: Client | None = None

    @property
    def address(self) -> str:
        return self.supervisor.address

    async def __aenter__(self) -> Client:
        address = await self.supervisor.start()
        try:
            self.client = await Client(address, **self._client_options).start()
        except BaseException:
            await self.supervisor.stop()
            raise
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.client is not None:
                await self.client.stop()
        finally:
            await self.supervisor.stop()
