"""benchmarks/bench.py runs its workers and reports for ours (the original needs a download)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_reports_speed_and_memory_for_the_nll_tasks(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--impls", "ours", "--tasks", "nll,image_nll",
         "--nll_steps", "4", "--nll_batch", "2", "--rounds", "1", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["nll_batch"] == 2
    rows = {row["task"]: row["ours"] for row in report["results"]}
    assert set(rows) == {"nll", "image_nll"}
    for task, row in rows.items():
        assert "error" not in row, (task, row, proc.stderr)
        assert row["images_per_s"] > 0 and row["peak_mb"] > 100 and row["rounds"] == 1
