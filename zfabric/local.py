"""`zfabric.local`: a whole fabric on this machine for one `async with` (layer 5).

The rule it keeps: nothing outlives the block. The scheduler and workers are
child processes of a `Supervisor`; leaving the block closes the client and
stops them all (and they die with this process if it is killed).

By default the fabric listens on ipc sockets in a private directory (mode
0700): only this user's processes can reach it, and a round trip is about
10 % faster than over loopback TCP (BENCHMARKS.md). Give `host` or `port` for
a TCP fabric that other hosts, or other users, can join.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterable

from .client import Client
from .registry import LOADING_MAIN, main_script
from .config import CurveConfig
from .supervisor import Supervisor


class local:  # noqa: N801 - used like a function: `async with zfabric.local(...) as client`
    """Start a scheduler and `workers` worker processes here and yield a connected `Client`.

    ``app`` lists the modules the workers may run functions from; the script
    this process runs (``python script.py``) is one too, so functions defined
    in it can be submitted (the workers import it as multiprocessing's spawn
    does: keep the code that starts the fabric under
    ``if __name__ == "__main__":``). Other keyword arguments are client
    options (`ClientConfig`).
    """

    def __init__(self, workers: int = 2, app: Iterable[str] | str = (), *, concurrency: int | None = None,
                 threads: int | None = None, port: int | None = None, host: str | None = None,
                 log_level: str = "warning", curve: CurveConfig | None = None, **client_options: Any) -> None:
        if os.environ.get(LOADING_MAIN):
            raise RuntimeError(
                "zfabric.local was started while a worker imported your script: start fabrics only under "
                "`if __name__ == \"__main__\":` (the workers import the script to find its functions)")
        apps = [app] if isinstance(app, str) else list(app)
        script = main_script()
        if script is not None and script not in apps:
            apps.append(script)
            client_options.setdefault("main_functions", True)
        worker_args = [arg for name in apps for arg in ("--app", name)]
        if concurrency is not None:
            worker_args += ["--concurrency", str(concurrency)]
        if threads is not None:
            worker_args += ["--threads", str(threads)]
        if client_options.get("serializer") == "pickle":  # the owner of a local fabric opts in at both ends
            worker_args.append("--accept-pickle")
        curve_args = ["--curve", curve.keys_dir] if curve is not None else []
        self._ipc_dir: str | None = None
        if host is None and port is None:
            self._ipc_dir = tempfile.mkdtemp(prefix="zfabric-")  # mode 0700
            bind = f"ipc://{os.path.join(self._ipc_dir, 'fabric')}"
        else:
            bind = f"tcp://{host or '127.0.0.1'}:{port or 0}"
        self.supervisor = Supervisor(["--bind", bind, *curve_args], worker_args + curve_args, workers, log_level)
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
            await self._stop_fabric()
            raise
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.client is not None:
                await self.client.stop()
        finally:
            await self._stop_fabric()

    async def _stop_fabric(self) -> None:
        try:
            await self.supervisor.stop()
        finally:
            if self._ipc_dir is not None:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)
