#!/usr/bin/env python3
"""Take the README's pictures: the dashboard (headless Chromium) and `zfabric top` (rich's SVG export).

    python scripts/screenshots.py        # writes docs/dashboard.png and docs/top.svg

Starts `zfabric up` with 3 workers (one tagged gpu), a dashboard, and a mixed workload (sleeps, a few
failures, tasks waiting for a tag nobody has), and photographs both views while it runs.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import zfabric
from zfabric import top

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TASKS = "zfabric.demo_tasks"


def start(*args: str, pattern: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "zfabric", "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(pattern, line)
        if found:
            return proc, found.group(1)
    raise RuntimeError(f"{args[0]} printed nothing matching {pattern}")


async def workload(address: str) -> None:
    async with zfabric.Client(address) as client:
        client.options(tags=["tpu"]).submit(f"{TASKS}:inc", 1)
        for i in range(3):
            client.submit(f"{TASKS}:fail", f"row {i * 17} of input.csv is malformed")
        gpu = client.options(tags=["gpu"], resources={"gpu": 1})
        for _ in range(40):
            gpu.submit(f"{TASKS}:asleep", 0.5)
        seen = top.Seen()
        for round_no in range(14):
            await asyncio.gather(*[client.submit(f"{TASKS}:asleep", 0.05 * (1 + round_no % 4)) for _ in range(4000)])
            seen.add(await client.status(), time.monotonic())
            if round_no == 12:
                shot(address)
                from rich.console import Console
                console = Console(record=True, width=130, file=open("/dev/null", "w"))
                console.print(top.view(seen, 130))
                console.save_svg(str(DOCS / "top.svg"), title="zfabric top")


def shot(address: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no Chromium: skipping docs/dashboard.png", file=sys.stderr)
        return
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                    f"--screenshot={DOCS / 'dashboard.png'}", "--window-size=1280,960", DASHBOARD],
                   capture_output=True, timeout=60, check=True)


def main() -> int:
    global DASHBOARD
    DOCS.mkdir(exist_ok=True)
    fabric, address = start("up", "--workers", "2", "--port", "0", "--app", TASKS, pattern=r"(tcp://[0-9.]+:\d+)")
    procs = [fabric]
    try:
        gpu, _ = start("worker", address, "--app", TASKS, "--name", "gpu-box", "--tag", "gpu", "--resources",
                       "gpu=2", pattern=r"(ZFABRIC-READY)")
        procs.append(gpu)
        dash, DASHBOARD = start("dashboard", address, "--port", "0", pattern=r"at (http://\S+/)")
        procs.append(dash)
        asyncio.run(workload(address))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
    print(f"wrote {DOCS / 'dashboard.png'} and {DOCS / 'top.svg'}")
    return 0


DASHBOARD = ""

if __name__ == "__main__":
    sys.exit(main())
