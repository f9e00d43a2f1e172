"""The benchmark scripts keep working (tiny counts; speed is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(240)


def test_bench_compare_tiny_run(tmp_path) -> None:
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "scripts/bench_compare.py", "--tiny", "--only", "raw,pool1,dask",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ratios" in result.stdout and "Floors" in result.stdout
    rows = {row["system"].split()[0]: row for row in json.loads(out.read_text())["rows"]}
    zf = rows["zfabric"]
    assert zf["tasks_per_s"] > 0 and 0 < zf["p50_s"] < zf["p99_s"] + 1e-9 and zf["bytes_per_pending"] > 0
    assert len(rows) == 4  # zfabric, raw pyzmq, the pool, and Dask (measured, or a row saying it is skipped)


def test_zfabric_bench_command_quick() -> None:
    result = subprocess.run([sys.executable, "-m", "zfabric", "--log-level", "warning", "bench", "--quick", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tasks_per_s"] > 0 and figures["sleep_wall_s"] > 0.5 and figures["mb_tasks_per_s"] > 0
