"""Preemption and faults: kills inside a save, SIGTERM under each launcher, damaged files, full disks."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from guided_diffusion import checkpoint_sets, checkpoints, preemption, train_util
from test_train_util import _process_group, make_loop, same_file  # noqa: F401 (the fixture is used)
from test_training_scripts import SCRIPTS, UNET, _env, image_dir  # noqa: F401 (the fixture is used)

REPO = os.path.dirname(SCRIPTS)
OWN = {"PYTHONPATH": REPO}  # this checkout's package, not another one installed in the venv
# learn_sigma off: the vb term of this tiny model overflows after a few steps at lr 1e-4.
FLAGS = [*UNET, "--learn_sigma", "False", "--image_size", "8", "--batch_size", "2", "--log_interval", "1",
         "--save_interval", "4", "--ema_rate", "0.9"]


def tiny_set(step):
    return dict(model={"w": torch.full((64,), float(step))}, opt={"state": {}, "param_groups": [{"lr": step}]},
                emas=[(0.9, lambda: {"w": torch.zeros(64)}), (0.99, lambda: {"w": torch.ones(64)})],
                state={"format": 1, "step": step})


def _killed_save(folder, step, at_event):
    """Fork; the child writes set ``step`` and dies (os._exit, like SIGKILL) at event ``at_event``."""
    pid = os.fork()
    if pid == 0:
        count = iter(range(1000))

        def on_event(path, stage):
            if next(count) == at_event:
                os._exit(9)

        try:
            checkpoint_sets.write_set(str(folder), step, on_event=on_event, **tiny_set(step))
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1] >> 8


def test_a_kill_at_every_point_of_a_save_leaves_only_whole_sets(tmp_path):
    checkpoint_sets.write_set(str(tmp_path), 0, **tiny_set(0))
    events = 2 * 5  # five temporaries written (two EMAs, opt, state, model), then five renames
    for at in range(events):
        folder = tmp_path / f"kill{at}"
        shutil.copytree(tmp_path, folder, ignore=shutil.ignore_patterns("kill*"))
        died = _killed_save(folder, 2, at)
        names = set(os.listdir(folder))
        for model in (n for n in names if n.startswith("model")):  # a visible model file has its whole set
            digits = checkpoint_sets.set_step(model)
            assert checkpoint_sets.missing_files(str(folder), digits) == [], (at, names)
            assert checkpoint_sets.damaged_file(str(folder), digits) is None, (at, names)
        newest = "000002" if died == 0 or "model000002.pt" in names else "000000"
        assert checkpoint_sets.find_latest(str(folder)) == str(folder / f"model{newest}.pt"), (at, names)
        checkpoint_sets.write_set(str(folder), 2, **tiny_set(2))  # the next save clears the leftovers
        assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_a_kill_at_any_point_of_a_training_save_resumes_to_the_same_weights(tmp_path):
    train_util.seed_all(5)
    make_loop(tmp_path / "straight", max_steps=4).run_loop()
    for at in range(10):  # the save of step 2: five temporaries written, five renames
        run = tmp_path / f"kill{at}"
        pid = os.fork()
        if pid == 0:
            try:
                events = iter(range(100))
                train_util._test_pause = lambda step: step == 2 and next(events) == at and os._exit(9)
                train_util.seed_all(5)
                make_loop(run, max_steps=4).run_loop()
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] >> 8 == 9
        newest = checkpoint_sets.find_latest(str(run))
        assert newest == str(run / ("model000002.pt" if at == 9 else "model000000.pt")), (at, os.listdir(run))
        make_loop(run, max_steps=4, resume=str(run)).run_loop()
        for name in ("model000004.pt", "ema_0.9_000004.pt", "ema_0.99_000004.pt", "opt000004.pt"):
            assert same_file(tmp_path / "straight" / name, run / name), (at, name)


@pytest.mark.parametrize("kind", ["model", "ema_0.99_", "opt", "state"])
def test_a_truncated_file_of_the_set_names_itself_and_the_newest_intact_set(tmp_path, kind):
    make_loop(tmp_path, max_steps=3).run_loop()  # sets 0 and 2
    path = tmp_path / f"{kind}000002.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(checkpoints.CheckpointError) as err:
        make_loop(tmp_path / "b", max_steps=4, resume=str(tmp_path))
    line = str(err.value)
    assert "\n" not in line and f"checkpoint file {path} is damaged" in line, line
    assert f"the newest intact checkpoint set there is {tmp_path / 'model000000.pt'}" in line, line


def test_a_failed_save_keeps_the_previous_set_and_says_how_much_space_it_needs(tmp_path):
    checkpoint_sets.write_set(str(tmp_path), 0, **tiny_set(0))
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a file-size limit below the set's size: the kernel refuses the write (EFBIG)
        message = "saved"
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
            big = tiny_set(2)
            big["model"] = {"w": torch.zeros(100_000)}
            checkpoint_sets.write_set(str(tmp_path), 2, **big)
        except checkpoint_sets.CheckpointSaveError as err:
            message = str(err)
        finally:
            os.write(write, message.encode())
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    message = os.read(read, 10_000).decode()
    assert message.startswith("cannot write checkpoint set 000002") and "the set needs about 1.1 MB" in message, message
    assert f"the previous set {tmp_path / 'model000000.pt'} is intact" in message, message
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # nothing added or lost


def _make_read_only(folder):
    """Make ``folder`` read-only (root ignores the mode bits: a read-only bind mount); an undo, or None."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return lambda: os.chmod(folder, 0o755)
    if subprocess.run(["mount", "--bind", "-o", "ro", folder, folder], capture_output=True).returncode:
        return None
    return lambda: subprocess.run(["umount", folder], check=True)


def test_a_read_only_log_dir_stops_training_with_one_line(tmp_path):
    make_loop(tmp_path, max_steps=1).run_loop()
    loop = make_loop(tmp_path, max_steps=3, resume=str(tmp_path))  # its log file is open already
    undo = _make_read_only(str(tmp_path))
    if undo is None:
        pytest.skip("cannot make a read-only folder here")
    try:
        with pytest.raises(checkpoint_sets.CheckpointSaveError, match="the previous set .*model000000.pt is intact"):
            loop.run_loop()
        assert not [n for n in os.listdir(tmp_path) if "000002" in n]
    finally:
        undo()


def test_signal_names_are_parsed_and_sigkill_is_refused():
    assert preemption.parse_signals("TERM, sigusr1,10") == [signal.SIGTERM, signal.SIGUSR1]
    assert preemption.parse_signals("none") == []
    for bad, words in (("KILL", "SIGKILL cannot be caught"), ("FOO", "unknown signal 'FOO'")):
        with pytest.raises(ValueError, match=words):
            preemption.parse_signals(bad)


def _launch(launcher, image_dir, log_dir, *extra):
    script = [os.path.join(SCRIPTS, "image_train.py"), "--data_dir", image_dir, *FLAGS, "--log_dir", str(log_dir),
              *extra]
    prefix = {"python": [sys.executable],
              "mpiexec": ["mpiexec", "-n", "2", sys.executable],
              "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000)]}[launcher]
    return prefix + script


def _uninterrupted(launcher, image_dir, log_dir, steps):
    r = subprocess.run(_launch(launcher, image_dir, log_dir, "--max_steps", str(steps)), env=_env(OWN),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _preempt_and_resume(launcher, image_dir, tmp_path, steps=10):
    """Start a run, signal it (SIGTERM to the launcher, as a scheduler does) after its first set, resume
    it with --resume_checkpoint auto, and compare with an uninterrupted run."""
    run = tmp_path / "preempted"
    proc = subprocess.Popen(_launch(launcher, image_dir, run, "--max_steps", "1000"), env=_env(OWN),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "model000004.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        # a scheduler signals every process of the job: the launcher, the ranks and their data workers
        os.killpg(proc.pid, signal.SIGTERM) if launcher != "torchrun" else proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = [line for line in (run / "log.txt").read_text().splitlines() if line.startswith("stopped on SIGTERM")]
    assert stopped and "exiting with status 75" in stopped[0], proc.stderr.read()[-3000:]
    if launcher != "torchrun":  # torchrun itself reports the signal it got (exit 1); its workers exit 75
        assert proc.returncode == preemption.PREEMPTED_EXIT_STATUS, proc.stderr.read()[-3000:]
    saved = checkpoint_sets.find_latest(str(run))
    assert int(checkpoint_sets.set_step(saved)) < steps and stopped[0].split()[5] == saved
    r = subprocess.run(_launch(launcher, image_dir, run, "--resume_checkpoint", "auto", "--max_steps", str(steps)),
                       env=_env(OWN), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _uninterrupted(launcher, image_dir, tmp_path / "straight", steps)
    for name in (f"model{steps:06d}.pt", f"ema_0.9_{steps:06d}.pt", f"opt{steps:06d}.pt"):
        assert same_file(tmp_path / "straight" / name, run / name), name


def test_sigterm_saves_a_set_exits_75_and_resumes_bit_identically(image_dir, tmp_path):
    _preempt_and_resume("python", image_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec")
def test_sigterm_under_mpiexec_saves_collectively_and_resumes_bit_identically(image_dir, tmp_path):
    _preempt_and_resume("mpiexec", image_dir, tmp_path)


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_collectively_and_resumes_bit_identically(image_dir, tmp_path):
    _preempt_and_resume("torchrun", image_dir, tmp_path)


def _bad_data(image_dir, tmp_path):
    """The test images, one cut short, and a copy whose file names give eight classes."""
    broken, many = tmp_path / "broken", tmp_path / "many"
    shutil.copytree(image_dir, broken)
    first = broken / sorted(os.listdir(broken))[0]
    first.write_bytes(first.read_bytes()[:100])
    many.mkdir()
    for i, name in enumerate(sorted(os.listdir(image_dir))):
        shutil.copy(os.path.join(image_dir, name), many / f"c{i}_{name}")
    return str(broken), str(many)


def _errors(r):
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if line.startswith("image_train.py: error: ")]


def test_bad_data_is_one_line_and_each_skipped_file_is_reported_once(image_dir, tmp_path):
    broken, many = _bad_data(image_dir, tmp_path)
    r = subprocess.run(_launch("python", many, tmp_path / "a", "--class_cond", "True", "--num_classes", "4",
                               "--max_steps", "3"), env=_env(OWN), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(_errors(r)) == 1 and "but --num_classes is 4" in _errors(r)[0], r.stderr[-2000:]
    # six images, three batches an epoch, a new worker process each epoch: three epochs
    r = subprocess.run(_launch("python", broken, tmp_path / "b", "--skip_bad_images", "True", "--max_steps", "9"),
                       env=_env(OWN), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("UserWarning: skipping unreadable image") == 1, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec")
def test_bad_data_on_one_rank_stops_every_rank_with_one_line(image_dir, tmp_path):
    broken, many = _bad_data(image_dir, tmp_path)
    for data, extra, words in ((broken, [], "cannot read image file"),
                               (many, ["--class_cond", "True", "--num_classes", "4"], "but --num_classes is 4")):
        r = subprocess.run(_launch("mpiexec", data, tmp_path / "log", *extra, "--max_steps", "3"), env=_env(OWN),
                           capture_output=True, text=True, timeout=300)
        # each rank prints the line; mpiexec may end the slower rank once the first one exited 2
        assert r.returncode == 2 and len(_errors(r)) in (1, 2), r.stderr[-3000:]
        assert all(words in line for line in _errors(r)), _errors(r)


def test_keep_checkpoints_prunes_older_sets_once_a_newer_one_is_complete(tmp_path):
    (tmp_path / "opt000000.pt").write_bytes(b"")  # the leftover of a save killed long ago
    make_loop(tmp_path, max_steps=4, save_interval=1, keep_checkpoints=2).run_loop()
    sets = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt"))
    assert sets == sorted(f"{kind}{s:06d}.pt" for s in (2, 3)
                          for kind in ("model", "opt", "state", "ema_0.9_", "ema_0.99_")), sets
