"""Process-group setup and small collective helpers.

One code path serves three ways of starting a job:

* a plain ``python script.py``: a ``torch.distributed`` group of size 1 is
  created in-process (no network, no mpi4py needed);
* ``mpiexec -n N python script.py``: mpi4py (imported only then) tells each
  process its rank and size, rank 0 picks a free TCP port and broadcasts it,
  and ``torch.distributed`` is initialised from that (``env://``);
* ``torchrun --nproc_per_node N script.py``: torchrun's environment variables
  are used directly (``env://``).

The backend is ``nccl`` when CUDA is available (one GPU per local rank, chosen
with ``torch.cuda.set_device``; ``CUDA_VISIBLE_DEVICES`` is never touched) and
``gloo`` otherwise. With more processes on a node than it has GPUs, ranks share
GPUs and the backend is ``gloo`` too: NCCL refuses two ranks on one GPU.
"""

import atexit
import os
import socket

import torch
import torch.distributed as dist

from . import checkpoints
from .errors import usage

# Environment variables set by MPI launchers: (rank, size) pairs.
_MPI_ENV = (
    ("PMI_RANK", "PMI_SIZE"),  # mpich / Intel MPI (hydra)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("PMIX_RANK", "PMIX_SIZE"),  # PMIx based launchers
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),  # MVAPICH
)
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# (rank, size) variables of every launcher, torchrun's first: under an MPI allocation
# that runs torchrun, RANK is the process's rank in the torch job.
_LAUNCHER_RANK_ENV = (("RANK", "WORLD_SIZE"),) + _MPI_ENV
_BROADCAST_CHUNK = 1 << 28  # bytes per broadcast when sharing a checkpoint


def _mpi_launched():
    return any(r in os.environ for r, _ in _MPI_ENV)


def _torchrun_launched():
    return all(k in os.environ for k in _TORCHRUN_ENV)


def _backend(local_world_size=1):
    """``nccl`` when every process on this node has a GPU of its own, else ``gloo``."""
    if torch.cuda.is_available() and local_world_size <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def _local_rank_from_env():
    for key in ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return None


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s.getsockname()[1]


def _host_address():
    try:
        return socket.gethostbyname(socket.getfqdn())
    except OSError:
        return "127.0.0.1"


def _select_device(local_rank):
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def _init_single_process():
    store = dist.HashStore()
    dist.init_process_group(_backend(), store=store, rank=0, world_size=1)


def _init_from_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            "This process was started by an MPI launcher (found PMI_RANK/OMPI_COMM_WORLD_* in the "
            "environment) but mpi4py is not installed. Install it with `pip install mpi4py mpich`, "
            "or start the job with `torchrun --nproc_per_node N` instead."
        ) from exc
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    _select_device(local_rank)
    if size == 1:
        _init_single_process()
        return
    # Every rank must pick the same backend: the busiest node decides.
    backend = _backend(comm.allreduce(local_size, op=MPI.MAX))
    address = _host_address() if rank == 0 else None
    port = _free_port() if rank == 0 else None
    address, port = comm.bcast((address, port), root=0)
    os.environ.setdefault("MASTER_ADDR", address)
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(size)
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size)


def _init_from_torchrun():
    local_rank = _local_rank_from_env()
    _select_device(local_rank or 0)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the same on every node under torchrun
    dist.init_process_group(
        _backend(local_world_size), init_method="env://", rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


_FLAG_GROUP = None  # the CPU (gloo) group of any_rank under NCCL; None: the default group


def setup_dist():
    """Create the default ``torch.distributed`` process group (a no-op if it exists).

    Works with no launcher, under ``mpiexec`` and under ``torchrun``; see the
    module docstring.
    """
    if dist.is_initialized():
        return
    if _torchrun_launched():
        _init_from_torchrun()
    elif _mpi_launched():
        _init_from_mpi()
    else:
        _select_device(_local_rank_from_env() or 0)
        _init_single_process()
    global _FLAG_GROUP
    # Yes/no flags shared every training step (a stop signal, a data error) go over a CPU group,
    # so that with NCCL they never wait for the GPU's queued work.
    _FLAG_GROUP = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None
    atexit.unregister(_destroy_at_exit)  # one entry, after mpi4py's: a group set up again moves it
    atexit.register(_destroy_at_exit)


def _destroy_at_exit():
    """Tear the process group down before the interpreter (and MPI) does.

    Left to interpreter shutdown, a live gloo group's threads can be destroyed
    while still joinable ("terminate called without an active exception"), which
    aborts a finished job with signal 6 under mpiexec. Registered after mpi4py's
    import, so it runs before MPI_Finalize.
    """
    global _FLAG_GROUP
    _FLAG_GROUP = None
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # shutting down anyway: never turn a finished run into a failure
            pass


def _group_exists():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    """This process's rank (0 when no process group exists)."""
    return dist.get_rank() if _group_exists() else 0


def get_world_size():
    """Number of processes in the job (1 when no process group exists)."""
    return dist.get_world_size() if _group_exists() else 1


def rank_and_world():
    """``(rank, world size)`` of the process group, else of the launcher, else ``(0, 1)``.

    Before `setup_dist` (or without it) the launcher's environment tells: torchrun's
    ``RANK``/``WORLD_SIZE``, mpich and Intel MPI's ``PMI_RANK``/``PMI_SIZE``, Open
    MPI's ``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_SIZE`` (and PMIx's, MVAPICH's).
    A launcher that gives a rank without a size counts as ``rank + 1`` processes.
    Never imports mpi4py. For collectives use `get_rank` / `get_world_size`, which
    describe the process group only.
    """
    if _group_exists():
        return dist.get_rank(), dist.get_world_size()
    for rank_var, size_var in _LAUNCHER_RANK_ENV:
        if rank_var in os.environ:
            rank = int(os.environ[rank_var])
            return rank, int(os.environ.get(size_var, rank + 1))
    return 0, 1


def is_main_process():
    """True on rank 0, the rank that writes checkpoints and logs."""
    return get_rank() == 0


def barrier():
    """Wait for every rank (does nothing in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def dev():
    """The device this process computes on: its GPU when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device():
    """Where tensors must live for collectives of the current backend: the GPU with NCCL, else the CPU."""
    if _group_exists() and dist.get_backend() == "nccl":
        return dev()
    return torch.device("cpu")


def _read_bytes(path):
    if "://" in path:
        import blobfile

        with blobfile.BlobFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _broadcast_bytes(data):
    """Send ``data`` (bytes on rank 0, None elsewhere) to every rank, in chunks.

    A negative length announces that rank 0 failed to read; every rank then raises.
    """
    device = comm_device()
    length = torch.tensor([len(data) if data is not None else -1], dtype=torch.int64, device=device)
    dist.broadcast(length, 0)
    n = int(length.item())
    if n < 0:
        return None
    buf = torch.empty(n, dtype=torch.uint8)
    if get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    for start in range(0, n, _BROADCAST_CHUNK):
        chunk = buf[start : start + _BROADCAST_CHUNK].to(device)
        dist.broadcast(chunk, 0)
        buf[start : start + _BROADCAST_CHUNK].copy_(chunk.cpu())
    return buf.numpy().tobytes()


def load_state_dict(path, **kwargs):
    """Load a checkpoint (``.pt`` read safely, or ``.safetensors``); every rank gets a copy.

    In a multi-process job only rank 0 touches the file system; the bytes are
    broadcast and each rank deserialises them. All ranks must call this.
    ``kwargs`` (e.g. ``map_location``) go to ``checkpoints.load_checkpoint_bytes``.
    """
    path = os.fspath(path)
    if get_world_size() == 1:
        return checkpoints.load_checkpoint_file(path, **kwargs)
    data, error = None, None
    if get_rank() == 0:
        try:
            data = _read_bytes(path)
        except OSError as exc:
            error = exc
    data = _broadcast_bytes(data)
    if data is None:
        if error is not None:
            raise usage(FileNotFoundError(
                f"Could not read checkpoint {path!r} on rank 0: {error}. Check the path given to "
                "--resume_checkpoint / --model_path."
            )) from error
        raise usage(FileNotFoundError(
            f"Rank 0 could not read checkpoint {path!r}; see rank 0's error. Check the path given to "
            "--resume_checkpoint / --model_path."
        ))
    return checkpoints.load_checkpoint_bytes(data, name=path, **kwargs)


def sync_params(params):
    """Overwrite ``params`` (tensors) on every rank with rank 0's values."""
    if get_world_size() == 1:
        return
    device = comm_device()
    with torch.no_grad():
        for p in params:
            if p.device == device:
                dist.broadcast(p, 0)
            else:
                t = p.detach().to(device)
                dist.broadcast(t, 0)
                p.copy_(t)


def all_gather_objects(obj):
    """List of ``obj`` from every rank, in rank order (``[obj]`` in one process)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag):
    """True on every rank when ``flag`` is true on any rank (collective: every rank must call it)."""
    if get_world_size() == 1:
        return bool(flag)
    on_cpu = _FLAG_GROUP is not None
    shared = torch.tensor([int(bool(flag))], dtype=torch.int32, device="cpu" if on_cpu else comm_device())
    dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=_FLAG_GROUP if on_cpu else None)
    return bool(shared.item())
