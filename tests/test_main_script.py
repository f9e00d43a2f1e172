"""Functions (and classes, and exceptions) defined in the script that starts a local fabric can be submitted:
the local workers import that script as multiprocessing's spawn does (SPEC section 8)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zfabric.registry import main_script

from conftest import ROOT

pytestmark = pytest.mark.timeout(120)
SCRIPT = Path(__file__).parent / "scripts" / "main_functions.py"


def _run(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=100, cwd=path.parent,
                          env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})


def test_script_functions_dataclasses_and_exceptions_work_on_local_fabrics(tmp_path: Path) -> None:
    script = tmp_path / "myscript.py"
    shutil.copy(SCRIPT, script)
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "map [0, 2, 4, 6, 8]", "pair Pair(a=3, b=4)", "echo Pair(a=1, b=2)", "caught Oops True",
        "executor [2, 4, 6]"]


def test_a_script_that_starts_a_fabric_unguarded_gets_a_clear_error_not_a_fork_bomb(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT.read_text().replace('if __name__ == "__main__":', "if True:"))
    done = _run(script)
    assert done.returncode != 0
    assert "under `if __name__ == \"__main__\":`" in done.stderr and "TaskRejected" in done.stderr


def test_no_script_when_run_as_a_module() -> None:
    assert main_script() is None  # pytest runs as `python -m pytest`: its own __main__ is not loaded


def test_the_readme_executor_tour_runs_as_written(tmp_path: Path) -> None:
    readme = (Path(ROOT) / "README.md").read_text()
    start = readme.index("import concurrent.futures, dataclasses")
    script = tmp_path / "tour.py"
    script.write_text(readme[start:readme.index("```", start)])
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["('s0', 1.5)", "('s999', 2497.5)"]
    assert "1,000/1,000 tasks" in done.stderr  # the progress bar


def test_an_unguarded_script_that_submits_only_app_functions_runs_as_before(tmp_path: Path) -> None:
    """Workers import the script only when a task names one of its functions."""
    script = tmp_path / "plain.py"
    script.write_text("import asyncio, zfabric\nfrom zfabric import demo_tasks\n\n\n"
                      "async def main():\n"
                      "    async with zfabric.local(workers=1, app=['zfabric.demo_tasks']) as client:\n"
                      "        print(await client.submit(demo_tasks.inc, 41))\n\n\n"
                      "asyncio.run(main())\n")
    done = _run(script)
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
