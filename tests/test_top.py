"""`zfabric top` (SPEC §9) in a real terminal: tmux runs it beside a working fabric; the test reads the
screen with `tmux capture-pane` and quits with `q`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import zfabric

from conftest import ROOT, TASKS, Fabric, async_wait_for, start_fabric

pytestmark = pytest.mark.timeout(90)
pytest.importorskip("rich", reason="the observe extra is not installed")


@pytest.fixture
def fab() -> Iterator[Fabric]:
    fabric = start_fabric(workers=2)
    yield fabric
    fabric.stop()


def _screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                          timeout=10).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
async def test_top_shows_workers_rates_and_failures_and_quits_on_q(fab: Fabric, tmp_path: Path) -> None:
    session = f"zftop-{uuid.uuid4().hex[:8]}"
    rc_file = tmp_path / "rc"
    command = f"cd {ROOT} && {sys.executable} -m zfabric top {fab.address}; echo $? > {rc_file}; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "45", command], check=True,
                   timeout=10, env={**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
                                    "TERM": "xterm-256color"})  # rich would believe COLUMNS over the pane
    try:
        async with zfabric.Client(fab.address) as client:
            await client.map(f"{TASKS}:inc", range(2000))
            with pytest.raises(zfabric.TaskError):
                await client.submit(f"{TASKS}:fail", "the disk is full")
            names = {w["name"] for w in (await client.status())["workers"]}

            def shown() -> bool:  # words may wrap where the pane is narrower than asked
                screen = " ".join(_screen(session).split())
                return all(name in screen for name in names) and "ValueError: the disk is full" in screen \
                    and "failed 1" in screen
            await async_wait_for(shown, 20, "top to show both workers and the failure")
            screen = " ".join(_screen(session).split())
            assert "tasks/s" in screen and "done 2,000" in screen and "q quits" in screen, screen
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True, timeout=10)
        await async_wait_for(lambda: rc_file.exists() and rc_file.read_text().strip() != "", 15, "top to quit on q")
        assert rc_file.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)


def test_names_from_peers_are_shown_as_text_not_markup() -> None:
    """A worker may call itself "[/]": rich would read it as markup and raise, ending every `top`."""
    from rich.console import Console

    from zfabric.top import Seen, view
    seen = Seen()
    hostile = "[/]"
    worker = {"name": hostile, "host": "[bold red]FAKE[/bold red]", "pid": 1, "running": 0, "free": 1, "done": 0}
    status = {"address": "tcp://x:1", "uptime_s": 1, "workers": [worker], "queued": 0, "running": 0, "done": 0,
              "failed": 1, "lost": 0, "redelivered": 0,
              "recent_failures": [{"t": 0.0, "task": 1, "worker": "[/bold]", "type": "[/]", "message": "[link]"}]}
    seen.add(status, 0.0)
    console = Console(record=True, width=150, file=open(os.devnull, "w"))
    console.print(view(seen, 150))
    text = console.export_text()
    assert "[/]" in text and "[bold red]FAKE[/bold red]" in text and "[/bold]" in text
