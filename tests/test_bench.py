"""benchmarks/bench.py runs its workers and reports for ours (the original needs a download)."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_bench(tmp_path, *options):
    """Run bench.py for ours, one round on one thread, with ``options``: its process and JSON report."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--impls", "ours", "--rounds", "1",
         "--threads", "1", *options, "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_bench_reports_speed_and_memory_for_the_nll_tasks(tmp_path):
    proc, report = _run_bench(tmp_path, "--tasks", "nll,image_nll", "--nll_steps", "4", "--nll_batch", "2")
    assert report["meta"]["nll_batch"] == 2
    rows = {row["task"]: row["ours"] for row in report["results"]}
    assert set(rows) == {"nll", "image_nll"}
    for task, row in rows.items():
        assert "error" not in row, (task, row, proc.stderr)
        assert row["images_per_s"] > 0 and row["peak_mb"] > 100 and row["rounds"] == 1


def test_bench_reports_model_flops_for_a_training_step(tmp_path):
    proc, report = _run_bench(tmp_path, "--tasks", "train", "--steps", "1")
    assert report["meta"]["original_precision"] == "fp32"
    (row,) = report["results"]
    ours = row["ours"]
    assert "error" not in ours, (ours, proc.stderr)
    # The small config's forward pass is 3.23 GFLOP per image (convolutions and matmuls);
    # a training step counts three of them.
    assert ours["model_gflop_per_image"] == pytest.approx(3 * 3.23, rel=0.01)
    assert ours["model_tflops"] == pytest.approx(ours["model_gflop_per_image"] * ours["images_per_s"] / 1e3)
    assert "mfu" not in ours  # no peak is known for a CPU
    assert "model GFLOP per image" in proc.stdout


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_original_precision_applies_to_the_original_only():
    bench = _bench_module()
    args = argparse.Namespace(precision="bf16", original_precision="fp16")
    assert bench.precision_of(bench.ROOT, args) == "bf16"
    assert bench.precision_of(Path("/elsewhere/original"), args) == "fp16"
    args.original_precision = ""
    assert bench.precision_of(Path("/elsewhere/original"), args) == "bf16"


def test_speed_flags_reach_the_workers_of_the_implementations_they_are_for():
    bench = _bench_module()
    original = Path("/elsewhere/original")

    def command(impl, *argv):
        args = _parse_bench_args(bench, ["--tasks", "train", "--compile", "--cudnn_benchmark", "--fused_adam", *argv])
        return bench.worker_command(impl, "train", args)

    for impl in (bench.ROOT, original):
        assert {"--compile", "--cudnn_benchmark"} <= set(command(impl))
    assert "--fused_adam" in command(bench.ROOT) and "--fused_adam" not in command(original)
    assert {"--compile", "--cudnn_benchmark", "--fused_adam"} <= set(command(bench.ROOT, "--flags_for", "ours"))
    assert not {"--compile", "--cudnn_benchmark", "--fused_adam"} & set(command(original, "--flags_for", "ours"))


def test_a_baseline_checkout_is_measured_as_ours():
    """--baseline_dir (a before/after comparison) gets ours' flags and precision, not the original's."""
    bench = _bench_module()
    baseline = Path("/elsewhere/before")
    argv = ["--compile", "--fused_adam", "--flags_for", "ours", "--precision", "bf16",
            "--original_precision", "fp16", "--baseline_dir", str(baseline)]
    args = _parse_bench_args(bench, argv)
    command = bench.worker_command(baseline, "train", args)
    assert {"--compile", "--fused_adam"} <= set(command)
    assert command[command.index("--precision") + 1] == "bf16"
    assert bench.precision_of(Path("/elsewhere/original"), args) == "fp16"


def _parse_bench_args(bench, argv):
    """bench.py's driver arguments for ``argv``, as its main() hands them to drive()."""
    captured = {}
    drive, bench.drive = bench.drive, lambda args: captured.setdefault("args", args)
    try:
        bench.main(argv)
    finally:
        bench.drive = drive
    return captured["args"]
