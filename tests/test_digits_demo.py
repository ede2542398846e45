"""scripts/digits_demo.py: the README's first run, as a seconds-long smoke run and in parts."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install scikit-learn)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "scripts", "digits_demo.py")


def load_demo():
    spec = importlib.util.spec_from_file_location("_digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_demo_runs_every_step_and_prints_the_grid_path(tmp_path):
    done = subprocess.run(
        [sys.executable, DEMO, "--quick", "--out_dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    last_line = done.stdout.strip().splitlines()[-1]
    grid_path = last_line.split(": ", 1)[1]
    assert os.path.isabs(grid_path) and os.path.isfile(grid_path)
    grid = Image.open(grid_path)
    assert grid.size == ((2 * 9 - 1) * 4, (10 * 9 - 1) * 4)  # 2 per row, a row per digit, 1-pixel gaps, 4x
    assert "recognised as requested class" in done.stdout

    with np.load(tmp_path / "demo" / "samples" / "samples_20x8x8x1.npz") as samples:
        assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (20, 8, 8, 1)
        np.testing.assert_array_equal(samples["arr_1"], np.repeat(np.arange(10), 2))
    assert len(os.listdir(tmp_path / "demo" / "digits")) == 1797
    assert os.path.isfile(tmp_path / "demo" / "train" / "config.json")


def test_class_grid_puts_each_class_on_its_own_row(tmp_path):
    demo = load_demo()
    per_class = 3
    images = np.repeat(np.arange(10, dtype=np.uint8) * 20, per_class)[:, None, None, None]
    images = np.broadcast_to(images, (30, 8, 8, 1)).copy()

    demo.save_class_grid(images, per_class, str(tmp_path / "grid.png"), scale=2, gap=1)

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == ((10 * 9 - 1) * 2, (3 * 9 - 1) * 2)
    for row in range(10):
        for col in range(3):
            cell = grid[row * 18:row * 18 + 16, col * 18:col * 18 + 16]
            assert np.all(cell == row * 20)


def test_training_command_passes_the_demo_flags_to_image_train():
    demo = load_demo()
    command = demo.train_command("data", "log", {"class_cond": True}, {"lr": 0.002}, seed=3)
    assert command[:2] == [sys.executable, os.path.join(REPO, "scripts", "image_train.py")]
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags == {"--data_dir": "data", "--log_dir": "log", "--seed": "3", "--class_cond": "True", "--lr": "0.002"}


def test_demo_never_mirrors_digits():
    demo = load_demo()
    assert demo.TRAIN_FLAGS["random_flip"] is False and demo.QUICK_TRAIN["random_flip"] is False
