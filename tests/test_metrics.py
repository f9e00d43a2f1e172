"""Prometheus metrics (SPEC §9): ``--metrics-port`` on `zfabric up`, scraped over real HTTP."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from typing import Any

import pytest

import zfabric

from conftest import ROOT, TASKS, async_wait_for, free_port_pair, start_fabric

pytestmark = pytest.mark.timeout(90)
prometheus_client = pytest.importorskip("prometheus_client", reason="the observe extra is not installed")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_metrics_count_tasks_workers_and_latencies() -> None:
    port = free_port_pair()
    fab = start_fabric(workers=2, extra=("--metrics-port", str(port)))
    try:
        async with zfabric.Client(fab.address) as client:
            assert await client.map(f"{TASKS}:inc", range(500)) == list(range(1, 501))
            for _ in range(3):
                with pytest.raises(zfabric.TaskError):
                    await client.submit(f"{TASKS}:fail", "no")

            def counted() -> Any:
                metrics = scrape(port)
                return (metrics.get(("zfabric_tasks_total", (("state", "done"),)), 0) >= 500
                        and metrics.get(("zfabric_tasks_total", (("state", "failed"),)), 0) >= 3 and metrics)
            metrics = await async_wait_for(counted, 15, "the metrics to count the tasks")
        assert metrics[("zfabric_tasks_total", (("state", "failed"),))] == 3
        assert metrics[("zfabric_tasks_total", (("state", "submitted"),))] == 503
        assert metrics[("zfabric_workers", ())] == 2
        assert metrics[("zfabric_queued", ())] == 0 and metrics[("zfabric_running", ())] == 0
        assert metrics[("zfabric_round_trip_seconds_count", ())] >= 500
        assert metrics[("zfabric_queue_wait_seconds_count", ())] >= 500
        assert metrics[("zfabric_round_trip_seconds_bucket", (("le", "+Inf"),))] >= 500
        per_worker = [v for (name, _), v in metrics.items() if name == "zfabric_worker_tasks_total"]
        assert len(per_worker) == 2 and sum(per_worker) >= 503
    finally:
        fab.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("module, args", [
    ("prometheus_client", ["scheduler", "--bind", "tcp://127.0.0.1:0", "--metrics-port", "0"]),
    ("rich", ["top", "tcp://127.0.0.1:9"]),
    ("aiohttp", ["dashboard", "tcp://127.0.0.1:9", "--port", "0"])])
def test_observe_commands_without_the_extra_say_which_extra_to_install(module: str, args: list[str]) -> None:
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from zfabric.cli import main\n"
            f"main({args!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode != 0
    assert "pip install 'zfabric[observe]'" in out.stderr, out.stderr
