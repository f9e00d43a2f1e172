"""`zfabric dashboard` (SPEC §9) in a real headless browser: Chromium loads the page while tasks run, and
the test reads the page as its script built it (``--dump-dom``) and takes a screenshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

import zfabric

from conftest import ROOT, TASKS, Fabric, async_wait_for, free_port_pair, read_line_matching, start_fabric, zfabric_cmd

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")]
pytest.importorskip("aiohttp", reason="the observe extra is not installed")


@pytest.fixture
def fab() -> Iterator[Fabric]:
    fabric = start_fabric(workers=2)
    yield fabric
    fabric.stop()


def browse(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=5000", *args, url],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def dashboard(fab: Fabric) -> Iterator[str]:
    """`zfabric dashboard` on the fabric: the page's URL."""
    port = free_port_pair()
    proc = subprocess.Popen(zfabric_cmd("--log-level", "warning", "dashboard", fab.address, "--port", str(port)),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        read_line_matching(proc, rf"at http://127.0.0.1:{port}/", 30)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


async def test_the_dashboard_shows_live_workers_rate_and_failures_in_a_browser(
        fab: Fabric, dashboard: str, tmp_path: Path) -> None:
    url = dashboard
    async with zfabric.Client(fab.address) as client:
        names = {w["name"] for w in (await client.status())["workers"]}
        with pytest.raises(zfabric.TaskError):
            await client.submit(f"{TASKS}:fail", "the disk is full")
        running = client.map(f"{TASKS}:asleep", [0.002] * 20_000)  # tasks flow while the page loads

        def rate_seen() -> bool:
            data = json.loads(urllib.request.urlopen(url + "api/status", timeout=5).read())
            return len(data["rates"]) >= 2 and any(rate > 0 for _, rate in data["rates"])
        await async_wait_for(rate_seen, 30, "the dashboard to see tasks flowing")
        dom = browse(url, "--dump-dom").stdout
        await running
    for name in names:
        assert name in dom, f"worker {name} is not on the page"
    assert "ValueError: the disk is full" in dom, "the failure is not on the page"
    assert fab.address in dom
    points = re.search(r'<polyline id="line" points="([^"]*)"', dom)
    assert points and len(points.group(1).split()) >= 2, "the task-rate chart has no line"
    shot = tmp_path / "dashboard.png"
    browse(url, f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.exists() and shot.stat().st_size > 10_000


def test_the_dashboard_refuses_requests_for_other_host_names(dashboard: str) -> None:
    """DNS rebinding: a page at evil.example whose name now points here must not read the status."""
    port = dashboard.rstrip("/").rsplit(":", 1)[1]
    url = dashboard + "api/status"
    ours = urllib.request.urlopen(urllib.request.Request(url, headers={"Host": f"localhost:{port}"}), timeout=5)
    assert ours.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Host": f"evil.example:{port}"}), timeout=5)
    assert refused.value.code == 403
