"""The training scripts end to end on a real folder of PNGs: run, checkpoint, kill, resume."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import train_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

UNET = ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1", "--attention_resolutions", "8",
        "--num_heads", "2", "--diffusion_steps", "20", "--learn_sigma", "True", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rs = np.random.RandomState(0)
    for i in range(6):
        pixels = rs.randint(0, 256, (10 + i, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{'cat' if i % 2 else 'dog'}_{i:03d}.png")
    return str(folder)


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH="")  # the scripts must find the package themselves
    env.update(extra or {})
    return env


def run_script(name, *args, env=None, cwd=REPO, returncode=0):
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], env=_env(env), capture_output=True,
                       text=True, timeout=300, cwd=cwd)
    assert r.returncode == returncode, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def start_script(name, *args, env=None):
    return subprocess.Popen([sys.executable, os.path.join(SCRIPTS, name), *args], env=_env(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)


def wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"training exited (code {proc.returncode}) before writing {path}"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


def same_checkpoint(a, b):
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if "param_groups" in x:
        return x["param_groups"] == y["param_groups"] and all(
            torch.equal(x["state"][k][n], y["state"][k][n]) for k in x["state"] for n in x["state"][k])
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def image_flags(image_dir, log_dir, *extra):
    return ["--data_dir", image_dir, "--image_size", "8", *UNET, "--batch_size", "2", "--log_interval", "1",
            "--save_interval", "2", "--ema_rate", "0.9,0.99", "--log_dir", str(log_dir), *extra]


@pytest.mark.slow
def test_image_train_resume_after_sigkill_is_bit_identical(image_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script("image_train.py", *image_flags(image_dir, straight, "--max_steps", "4"))
    assert (straight / "config.json").exists() and (straight / "progress.csv").exists()

    proc = start_script("image_train.py", *image_flags(image_dir, killed, "--max_steps", "1000"))
    try:
        wait_for(killed / "state000002.pt", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Flags come back from the config saved beside the checkpoint; any file of the set names it.
    run_script("image_train.py", "--resume_checkpoint", str(killed / "ema_0.99_000002.pt"), "--max_steps", "4")
    for name in ("model000004.pt", "ema_0.9_000004.pt", "ema_0.99_000004.pt", "opt000004.pt"):
        assert same_checkpoint(straight / name, killed / name), name


@pytest.mark.slow
def test_kill_during_save_never_resumes_from_a_partial_set(image_dir, tmp_path):
    log_dir = tmp_path / "run"
    proc = start_script("image_train.py", *image_flags(image_dir, log_dir, "--max_steps", "1000"),
                        env={train_util.SAVE_PAUSE_ENV: "120@2"})
    try:  # the save of step 2 pauses after its first temporary file
        deadline = time.time() + 240
        while not [n for n in (os.listdir(log_dir) if log_dir.is_dir() else ()) if n.endswith(".tmp") and "000002" in n]:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = set(os.listdir(log_dir))
    assert "model000000.pt" in names and "model000002.pt" not in names
    assert train_util.find_latest_checkpoint(str(log_dir)) == str(log_dir / "model000000.pt")

    run_script("image_train.py", "--resume_checkpoint", str(log_dir), "--max_steps", "3")
    names = set(os.listdir(log_dir))  # steps 1 and 2 ran again; the set of step 2 is now complete
    assert {"model000002.pt", "ema_0.9_000002.pt", "ema_0.99_000002.pt", "opt000002.pt", "state000002.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")], names  # the killed save's temporaries are gone
    log = (log_dir / "log.txt").read_text()
    assert "exact resume from" in log and "state000000.pt" in log


@pytest.mark.slow
def test_super_res_train_runs_and_resumes(image_dir, tmp_path):
    flags = ["--data_dir", image_dir, "--large_size", "8", "--small_size", "4", *UNET, "--batch_size", "2",
             "--log_interval", "1", "--save_interval", "2", "--log_dir", str(tmp_path)]
    run_script("super_res_train.py", *flags, "--max_steps", "2")
    assert {"model000002.pt", "ema_0.9999_000002.pt", "opt000002.pt", "state000002.pt"} <= set(os.listdir(tmp_path))
    run_script("super_res_train.py", "--resume_checkpoint", str(tmp_path), "--max_steps", "4")
    assert {"model000004.pt", "state000004.pt"} <= set(os.listdir(tmp_path))


@pytest.mark.slow
def test_classifier_train_runs_on_cpu_with_validation_and_resumes(image_dir, tmp_path):
    flags = ["--data_dir", image_dir, "--val_data_dir", image_dir, "--image_size", "8", "--classifier_width", "32",
             "--classifier_depth", "1", "--classifier_attention_resolutions", "4", "--diffusion_steps", "20",
             "--num_classes", "2", "--batch_size", "2", "--log_interval", "1", "--eval_interval", "1",
             "--save_interval", "2", "--log_dir", str(tmp_path)]
    run_script("classifier_train.py", *flags, "--iterations", "3")
    assert {"model000002.pt", "model000003.pt", "opt000003.pt"} <= set(os.listdir(tmp_path))
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_loss", "val_acc@1"} <= set(header)
    run_script("classifier_train.py", *flags, "--iterations", "4",
               "--resume_checkpoint", str(tmp_path / "model000003.pt"))
    assert "model000004.pt" in os.listdir(tmp_path)


def test_training_scripts_import_cleanly():
    code = ("import runpy, sys; sys.argv = ['x', '--help'];\n"
            "for s in ['image_train', 'super_res_train', 'classifier_train']:\n"
            "    mod = runpy.run_path('scripts/%s.py' % s, run_name='not_main')\n"
            "    assert 'create_argparser' in mod, s\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr


# What the user typed wrong, per script: the flags (IMAGES stands for the test folder of
# images, EMPTY for an empty folder) and the words the one-line error must carry.
BAD_INPUTS = {
    "missing data folder": ("image_train.py", ["--data_dir", "nowhere", *UNET, "--image_size", "8"],
                            "data directory 'nowhere' does not exist; check --data_dir"),
    "unparsable channel_mult": ("image_train.py", ["--data_dir", "IMAGES", "--image_size", "8",
                                                   "--channel_mult", "1,x"],
                                "--channel_mult must be comma-separated numbers"),
    "width not a multiple of 32": ("image_train.py", ["--data_dir", "IMAGES", "--image_size", "8",
                                                      "--num_channels", "48"],
                                   "Choose --num_channels"),
    "batch larger than the data": ("image_train.py", ["--data_dir", "IMAGES", *UNET, "--image_size", "8",
                                                      "--batch_size", "7"],
                                   "fewer than one batch of 7"),
    "missing resume checkpoint": ("image_train.py", ["--data_dir", "IMAGES", "--resume_checkpoint", "nothere.pt"],
                                  "--resume_checkpoint: model file 'nothere.pt' does not exist"),
    "bad respacing": ("image_train.py", ["--data_dir", "IMAGES", *UNET, "--image_size", "8",
                                         "--timestep_respacing", "ddimx"],
                      "cannot parse timestep_respacing 'ddimx'"),
    "low resolution above the high one": ("super_res_train.py", ["--data_dir", "IMAGES", "--large_size", "8",
                                                                 "--small_size", "16"],
                                          "--small_size (16) must not exceed --large_size (8)"),
    "empty data folder": ("classifier_train.py", ["--data_dir", "EMPTY", "--image_size", "8"],
                          "no images found in data directory"),
    "a truncated image, read by a worker process": (
        "image_train.py", ["--data_dir", "BROKEN", *UNET, "--image_size", "8", "--batch_size", "2",
                           "--num_workers", "1"],
        "cannot read image file"),
    "a truncated image, read in the main process": (
        "image_train.py", ["--data_dir", "BROKEN", *UNET, "--image_size", "8", "--batch_size", "2",
                           "--num_workers", "0"],
        "or pass --skip_bad_images True"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_training_scripts_print_usage_errors_as_one_line_and_exit_2(case, image_dir, tmp_path):
    script, flags, words = BAD_INPUTS[case]
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(image_dir, broken)
    for name in sorted(os.listdir(broken)):  # every file cut short: the first batch meets one
        data = (broken / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 3])
    flags = [{"IMAGES": image_dir, "EMPTY": str(tmp_path / "empty"), "BROKEN": str(broken)}.get(f, f) for f in flags]
    r = run_script(script, *flags, "--log_dir", str(tmp_path / "log"), cwd=tmp_path, returncode=2)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and words in last, last
