"""Start a `zfabric up` fabric for a benchmark script and give its address (scripts import it)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from typing import Iterator


@contextlib.contextmanager
def fabric_up(*flags: str, workers: int = 2) -> Iterator[str]:
    """``zfabric up`` with the demo tasks and these flags, stopped (drained) afterwards."""
    up = subprocess.Popen([sys.executable, "-m", "zfabric", "--log-level", "warning", "up", "--workers",
                           str(workers), "--port", "0", "--app", "zfabric.demo_tasks", *flags],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            found = re.search(r"(tcp://[0-9.]+:\d+)", line)
            if found:
                break
        else:
            raise RuntimeError("zfabric up printed no address")
        yield found.group(1)
    finally:
        up.terminate()
        up.wait(30)
