"""The README's main job, short: ``accplans demo`` on the small ring, as a user runs it."""

import os
import re
import subprocess
import sys

import psutil


def test_demo_on_the_small_ring_reports_and_leaves_nothing_running(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env["COLUMNS"] = "200"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    proc = subprocess.run(
        [sys.executable, "-m", "accplans.cli", "demo", "--machine", "small",
         "--data-dir", str(tmp_path / "data"), "--correctors", "6"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # the report: orbit rms, ORM shape (16 BPMs x 2 planes, 6 + 6 correctors), the agreement
    # with pyAT's design ORM per block, where the data is
    rms = re.search(r"orbit rms x / y \(BPM readings\)\s*[│|]\s*([\d.]+) / ([\d.]+) um", out)
    assert rms is not None, out
    assert 1.0 < float(rms.group(1)) < 5000.0
    assert re.search(r"ORM shape \(rows x correctors\)\s*[│|]\s*32 x 12", out), out
    blocks = dict(re.findall(r"block (\w/\w)\s*[│|]\s*([\d.]+)%", out))
    assert set(blocks) == {"x/h", "x/v", "y/h", "y/v"}, out
    # a twin with seeded errors is not the design lattice, but it is close to it
    assert all(0.01 < float(v) < 20.0 for v in blocks.values()), blocks
    assert (tmp_path / "data" / "api_key").exists()
    assert "every process the demo started is stopped" in out
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.status() != "zombie"}
    assert after <= before
