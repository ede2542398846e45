"""dist_util: one plain process, no mpi4py, and data-parallel equivalence under mpiexec and torchrun."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from guided_diffusion import dist_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def run_python(code, env_extra=None, drop_env=()):
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(env_extra or {})
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "RANK", "WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "PMIX_RANK")


def test_single_process_group_has_size_one_and_setup_is_idempotent():
    dist_util.setup_dist()
    dist_util.setup_dist()
    assert torch.distributed.get_world_size() == 1
    assert torch.distributed.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    assert (dist_util.get_rank(), dist_util.get_world_size(), dist_util.is_main_process()) == (0, 1, True)
    dist_util.barrier()


@pytest.mark.parametrize("gpus, local_processes, backend", [
    (0, 1, "gloo"), (0, 4, "gloo"),   # CPU
    (1, 1, "nccl"), (8, 8, "nccl"),   # a GPU per process
    (1, 2, "gloo"), (2, 3, "gloo"),   # processes share GPUs: NCCL would refuse
])
def test_backend_is_nccl_only_with_a_gpu_per_local_process(monkeypatch, gpus, local_processes, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert dist_util._backend(local_processes) == backend


def test_torchrun_with_more_processes_than_gpus_starts_gloo(monkeypatch):
    chosen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.setdefault("device", device))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: chosen.update(backend=backend, **kw))
    for key, value in dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
                           LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    dist_util._init_from_torchrun()
    assert chosen == {"device": 0, "backend": "gloo", "init_method": "env://", "rank": 1, "world_size": 2}


def test_plain_process_needs_no_mpi4py():
    r = run_python(
        """
        import sys
        sys.modules["mpi4py"] = None  # any import of mpi4py now fails
        from guided_diffusion import dist_util
        dist_util.setup_dist()
        print(dist_util.get_world_size(), "mpi4py" in sys.modules and sys.modules["mpi4py"] is not None)
        """,
        drop_env=LAUNCHER_VARS,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "False"]


def test_mpi_launch_without_mpi4py_explains_the_fix():
    r = run_python(
        """
        import sys
        sys.modules["mpi4py"] = None
        from guided_diffusion import dist_util
        dist_util.setup_dist()
        """,
        env_extra={"PMI_RANK": "0", "PMI_SIZE": "2"},
        drop_env=LAUNCHER_VARS,
    )
    assert r.returncode != 0
    assert "mpi4py is not installed" in r.stderr and "torchrun" in r.stderr


def test_load_state_dict_in_one_process(tmp_path):
    dist_util.setup_dist()
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([1, 2])}, path)
    sd = dist_util.load_state_dict(str(path), map_location="cpu")
    assert torch.equal(sd["w"], torch.arange(6.0).reshape(2, 3)) and torch.equal(sd["n"], torch.tensor([1, 2]))


def test_sync_params_keeps_values_in_one_process():
    dist_util.setup_dist()
    ps = [torch.ones(3), torch.full((2, 2), 5.0)]
    dist_util.sync_params(ps)
    assert torch.equal(ps[0], torch.ones(3)) and torch.equal(ps[1], torch.full((2, 2), 5.0))


@pytest.fixture
def no_launcher(monkeypatch):
    for rank_var, size_var in (("RANK", "WORLD_SIZE"),) + dist_util._MPI_ENV:
        monkeypatch.delenv(rank_var, raising=False)
        monkeypatch.delenv(size_var, raising=False)


def test_rank_and_world_without_group_or_launcher_is_one_process(no_launcher):
    assert dist_util.rank_and_world() == (0, 1)


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)),                              # torchrun
    ({"PMI_RANK": "2", "PMI_SIZE": "3"}, (2, 3)),                            # mpich, Intel MPI
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, (1, 2)),    # Open MPI
    ({"PMI_RANK": "2"}, (2, 3)),                                             # no size: at least rank + 1
    ({"RANK": "3", "WORLD_SIZE": "4", "PMI_RANK": "0", "PMI_SIZE": "1"}, (3, 4)),  # torchrun's win
])
def test_rank_and_world_before_setup_come_from_the_launcher(no_launcher, monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dist_util.rank_and_world() == expected


def test_rank_and_world_of_a_process_group_win_over_the_environment(no_launcher, monkeypatch):
    dist_util.setup_dist()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert dist_util.rank_and_world() == (0, 1)


def test_comm_device_is_where_the_backend_communicates(no_launcher):
    dist_util.setup_dist()
    if torch.distributed.get_backend() == "gloo":
        assert dist_util.comm_device() == torch.device("cpu")
    else:
        assert dist_util.comm_device() == dist_util.dev()


# ---------------------------------------------------------------- data parallel

WORKER = """
import json, sys
import numpy as np
import torch
torch.set_num_threads(1)
from guided_diffusion import dist_util, logger, train_util
from guided_diffusion.script_util import create_gaussian_diffusion, create_model

out_dir, global_batch, steps = sys.argv[1], 4, 3
dist_util.setup_dist()
rank, world = dist_util.get_rank(), dist_util.get_world_size()
local = global_batch // world

# Deterministic per-example noise and timesteps, so that only the gradient
# averaging differs between 1 rank x 4 and 2 ranks x 2.
diffusion = create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
plain_losses = diffusion.training_losses
diffusion.training_losses = lambda model, x, t, model_kwargs=None, noise=None: plain_losses(
    model, x, t, model_kwargs=model_kwargs, noise=torch.sin(37.0 * x + 1.0))

class FixedTimesteps:
    def sample(self, batch_size, device):
        return torch.full((batch_size,), 7, dtype=torch.long, device=device), torch.ones(batch_size, device=device)

def shard():
    k = 0
    while True:
        x = np.random.RandomState(100 + k).uniform(-1, 1, (global_batch, 3, 8, 8)).astype(np.float32)
        yield torch.from_numpy(x[rank * local:(rank + 1) * local]), {}
        k += 1

torch.manual_seed(rank)  # different inits: sync_params must make them equal
model = create_model(8, 32, 1, channel_mult="1", attention_resolutions="8", num_heads=2, learn_sigma=True)
logger.configure(dir=out_dir + "/log", format_strs=["log"])
train_util.TrainLoop(model=model, diffusion=diffusion, data=shard(), batch_size=local, microbatch=-1,
                     lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=100, resume_checkpoint="",
                     schedule_sampler=FixedTimesteps(), max_steps=steps).run_loop()
sd = dist_util.load_state_dict(out_dir + "/log/model000003.pt", map_location="cpu")
torch.save(sd, f"{out_dir}/rank{rank}.pt")
with open(f"{out_dir}/info{rank}.json", "w") as f:
    json.dump({"world": world, "backend": torch.distributed.get_backend()}, f)
"""


def _launch(cmd, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd + [str(tmp_path / "worker.py"), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def single_rank_result(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    _launch([sys.executable], d)
    return torch.load(d / "rank0.pt", weights_only=True)


def _assert_matches(single, folder, world):
    """Ranks agree exactly; with one rank they agree up to a tenth of one Adam step (lr=1e-3).

    Adam turns float rounding in near-zero gradients into sign flips, hence the
    absolute tolerance; unsynchronised gradients would differ by whole steps.
    """
    reference = torch.load(folder / "rank0.pt", weights_only=True)
    for rank in range(world):
        info = json.loads((folder / f"info{rank}.json").read_text())
        assert info == {"world": world, "backend": "gloo"}
        got = torch.load(folder / f"rank{rank}.pt", weights_only=True)
        for key, value in single.items():
            assert torch.equal(got[key], reference[key]), key
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.slow
def test_two_mpi_ranks_match_one_rank_with_double_batch(single_rank_result, tmp_path):
    _launch([os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable], tmp_path)
    _assert_matches(single_rank_result, tmp_path, 2)


@pytest.mark.slow
def test_two_torchrun_ranks_match_one_rank_with_double_batch(single_rank_result, tmp_path):
    _launch([os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"], tmp_path)
    _assert_matches(single_rank_result, tmp_path, 2)
