"""``make bench-rtt`` runs end to end (tiny N). Not a timing test: the speed goal
(server within 1.3x of the C echo floor) lives in the benchmark, not here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")


def test_bench_rtt_prints_both_figures_and_a_ratio(tmp_path: Path) -> None:
    report = tmp_path / "rtt.json"
    cpu = min(os.sched_getaffinity(0))  # CPU 0 by default; the first one we may use here
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench_rtt", "--ops", "200", "--rounds", "2",
         "--warmup", "20", "--pin", str(cpu), "--build-dir", str(tmp_path / "bin"),
         "--json", str(report), "--also-libvfio-user"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    number = r"\d+\.\d+"
    assert re.search(rf"^\s+server\s+{number}\s+{number}\s", out, re.M), out
    assert re.search(rf"^\s+echo\s+{number}\s+{number}\s+1\.00x", out, re.M), out
    assert re.search(rf"ratio server/echo: {number} \(median\)", out), out
    assert re.search(r"^\s+libvfio-user\s+", out, re.M), out  # a column, figures or n/a

    data = json.loads(report.read_text())
    (regime,) = data["regimes"]
    assert regime["cpus"] == [cpu]
    for name in ("server", "echo"):
        column = regime["targets"][name]
        assert len(column["rounds_us"]) == 2
        assert 0 < column["min_us"] <= column["median_us"]
    assert regime["ratio_median"] > 0
    assert (tmp_path / "bin" / "echo_server").exists()


def test_unpinned_pass_is_reported_when_asked(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench_rtt", "--ops", "50", "--rounds", "1",
         "--warmup", "0", "--pin", "none", "--build-dir", str(tmp_path / "bin")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unpinned" in proc.stdout
    assert "pinned, all on CPU" not in proc.stdout
    assert "ratio server/echo" in proc.stdout
