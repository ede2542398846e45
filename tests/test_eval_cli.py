"""The evaluator command line, end to end with random Inception weights."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations import evaluator, inception, metrics
from evaluations.inception import InceptionV3

ROOT = Path(__file__).resolve().parents[1]
LINES = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
ORIGINAL_PROGRESS_LINES = [
    "warming up TensorFlow...",
    "computing reference batch activations...",
    "computing/reading reference batch statistics...",
    "computing sample batch activations...",
    "computing/reading sample batch statistics...",
    "Computing evaluations...",
]


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Random-weight network saved under the published name, and two small batches."""
    folder = tmp_path_factory.mktemp("eval_cli")
    torch.manual_seed(0)
    torch.save(InceptionV3().state_dict(), folder / inception.WEIGHTS_FILENAME)
    rng = np.random.RandomState(0)
    np.savez(folder / "ref.npz", rng.randint(0, 256, size=(6, 16, 16, 3), dtype=np.uint8))
    np.savez(folder / "sample.npz", rng.randint(0, 128, size=(5, 16, 16, 3), dtype=np.uint8))
    return folder


def _scores(output: str) -> dict:
    found = dict(re.findall(r"^(Inception Score|FID|sFID|Precision|Recall): (\S+)$", output, re.M))
    assert list(found) == LINES, output
    return {k: float(v) for k, v in found.items()}


def test_cli_prints_the_five_scores_in_process(batches, tmp_path, monkeypatch, capsys):
    # The 2048x2048 matrix square roots take a minute on 2 CPU cores; the
    # subprocess test below runs them for real, here they are stubbed.
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.eye(len(m)))
    monkeypatch.setenv(inception.ALLOW_UNVERIFIED_ENV, "1")
    torch.set_num_threads(1)
    with pytest.warns(UserWarning, match="NOT comparable"):
        code = evaluator.main(
            [
                str(batches / "ref.npz"),
                str(batches / "sample.npz"),
                "--inception_weights",
                str(batches / inception.WEIGHTS_FILENAME),
                "--batch_size",
                "4",
                "--device",
                "cpu",
                "--cache_dir",
                str(tmp_path / "cache"),
            ]
        )
    out = capsys.readouterr().out
    assert code == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one activations file per batch file
    scores = _scores(out)
    # The original's lines in its order (its first says "warming up TensorFlow..."),
    # each score printed as Python prints a float.
    lines = out.splitlines()
    assert lines[1:6] == ORIGINAL_PROGRESS_LINES[1:]
    assert lines[6:] == [f"{name}: {scores[name]}" for name in LINES]
    assert scores["Inception Score"] >= 1.0
    assert scores["Precision"] in {i / 5 for i in range(6)}  # a fraction of the 5 samples
    assert scores["Recall"] in {i / 6 for i in range(7)}  # a fraction of the 6 references


def test_cli_without_weights_explains_where_to_get_them(batches, monkeypatch, capsys):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    code = evaluator.main([str(batches / "ref.npz"), str(batches / "sample.npz"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert inception.WEIGHTS_FILENAME in err and "fid_weights" in err and "--inception_weights" in err


def test_cli_refuses_weights_with_a_wrong_digest(batches, monkeypatch, capsys):
    monkeypatch.delenv(inception.ALLOW_UNVERIFIED_ENV, raising=False)
    code = evaluator.main(
        [
            str(batches / "ref.npz"),
            str(batches / "sample.npz"),
            "--inception_weights",
            str(batches),
            "--device",
            "cpu",
        ]
    )
    assert code == 1 and "sha256" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_script_end_to_end_with_random_weights(batches):
    env = dict(
        os.environ,
        **{
            inception.WEIGHTS_ENV: str(batches / inception.WEIGHTS_FILENAME),
            inception.ALLOW_UNVERIFIED_ENV: "1",
            "PYTHONWARNINGS": "ignore",
        },
    )
    env.pop("PYTHONPATH", None)  # the script must find its package by itself
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluations" / "evaluator.py"), str(batches / "ref.npz"), str(batches / "sample.npz"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        cwd=batches,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    scores = _scores(result.stdout)
    assert np.isfinite(scores["FID"]) and scores["FID"] > 0
    assert np.isfinite(scores["sFID"]) and scores["sFID"] >= 0


def test_cli_reports_a_missing_batch_file_without_a_traceback(batches, monkeypatch, capsys):
    monkeypatch.setenv(inception.ALLOW_UNVERIFIED_ENV, "1")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(batches / inception.WEIGHTS_FILENAME))
    with pytest.warns(UserWarning):
        code = evaluator.main([str(batches / "absent.npz"), str(batches / "sample.npz"), "--device", "cpu"])
    assert code == 1 and "absent.npz" in capsys.readouterr().err


def test_exact_flag_switches_precision_recall_to_float64_distances():
    assert not evaluator.create_argparser().parse_args(["ref.npz", "sample.npz"]).exact
    assert evaluator.create_argparser().parse_args(["ref.npz", "sample.npz", "--exact"]).exact
    assert evaluator.Evaluator(device="cpu").manifold_estimator.distance_block.dtype == "float16"
    assert evaluator.Evaluator(device="cpu", exact=True).manifold_estimator.distance_block.dtype == "float64"
