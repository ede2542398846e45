"""Specification of guided_diffusion.logger: files, formats, configuration and rank averaging."""

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from guided_diffusion import logger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("OPENAI_LOGDIR", "OPENAI_LOG_FORMAT", "OPENAI_LOG_FORMAT_MPI",
               "PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK")


@pytest.fixture(autouse=True)
def isolated_logger(monkeypatch):
    """Every test starts without a logger and without launcher variables; its loggers are closed after."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    saved = logger.Logger.CURRENT, logger.Logger.DEFAULT
    logger.Logger.CURRENT = logger.Logger.DEFAULT = None
    yield
    for made in {logger.Logger.CURRENT, logger.Logger.DEFAULT} - {None}:
        made.close()
    logger.Logger.CURRENT, logger.Logger.DEFAULT = saved


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_configure_writes_the_requested_files_in_dir(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log", "csv", "json"])
    logger.logkv("loss", 0.5)
    logger.dumpkvs()
    assert logger.get_dir() == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "progress.csv", "progress.json"]


def test_csv_new_column_rewrites_header_and_pads_earlier_rows(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    logger.logkvs({"step": 0, "loss": 1.25})
    logger.dumpkvs()
    logger.logkvs({"step": 1, "loss": 0.75})
    logger.dumpkvs()
    logger.logkvs({"step": 2, "grad_norm": 3.0, "acc": 0.5})
    logger.dumpkvs()
    assert read(tmp_path / "progress.csv") == (
        "loss,step,acc,grad_norm\n"
        "1.25,0,,\n"
        "0.75,1,,\n"
        ",2,0.5,3.0\n"
    )


def test_json_has_one_object_per_dump(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["json"])
    logger.logkv("a", 1)
    logger.dumpkvs()
    logger.logkv("b", "text")
    logger.logkv("c", 2.5)
    logger.dumpkvs()
    rows = [json.loads(line) for line in read(tmp_path / "progress.json").splitlines()]
    assert rows == [{"a": 1}, {"b": "text", "c": 2.5}]


def test_numpy_and_torch_scalars_are_written_as_plain_numbers(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv", "json"])
    logger.logkv("np", np.float32(0.5))
    logger.logkv("pt", torch.tensor(3))
    logger.dumpkvs()
    assert read(tmp_path / "progress.csv") == "np,pt\n0.5,3\n"
    assert json.loads(read(tmp_path / "progress.json")) == {"np": 0.5, "pt": 3}


def test_logkv_mean_averages_within_a_dump_and_dumpkvs_clears(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[])
    for value in (1.0, 2.0, 6.0):
        logger.logkv_mean("loss", value)
    logger.logkv("step", 7)
    assert logger.getkvs() == {"loss": 3.0, "step": 7}
    assert logger.dumpkvs() == {"loss": 3.0, "step": 7}
    assert logger.getkvs() == {}
    logger.logkv_mean("loss", 10.0)
    assert logger.dumpkvs() == {"loss": 10.0}


def test_text_output_has_messages_and_a_table_of_values(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    logger.log("hello", 42)
    logger.logkv("loss", 0.123456)
    logger.logkv("step", 123456)
    logger.dumpkvs()
    lines = read(tmp_path / "log.txt").splitlines()
    assert lines[0] == f"Logging to {tmp_path}"
    assert "hello 42" in lines
    assert any(line.startswith("| loss") and "0.123" in line for line in lines)
    assert any(line.startswith("| step") and "123456" in line for line in lines)


def test_set_level_filters_messages_below_it(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    logger.debug("hidden")
    logger.set_level(logger.DEBUG)
    logger.debug("shown")
    logger.set_level(logger.ERROR)
    logger.warn("hidden too")
    logger.error("error shown")
    text = read(tmp_path / "log.txt")
    assert "shown" in text and "error shown" in text
    assert "hidden" not in text


def test_logdir_comes_from_openai_logdir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "run"))
    logger.configure(format_strs=["csv"])
    assert logger.get_dir() == str(tmp_path / "run")
    assert os.path.isfile(tmp_path / "run" / "progress.csv")


def test_relative_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger.configure(dir="rel", format_strs=[])
    assert logger.get_dir() == str(tmp_path / "rel")


def test_without_dir_or_env_a_fresh_temp_dir_is_used_and_printed(capsys):
    logger.configure(format_strs=["stdout"])
    first = logger.get_dir()
    logger.configure(format_strs=["stdout"])
    second = logger.get_dir()
    assert os.path.isabs(first) and os.path.isdir(first) and first != second
    assert f"Logging to {first}" in capsys.readouterr().out
    os.rmdir(first)
    os.rmdir(second)


def test_default_formats_come_from_openai_log_format(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "json,log")
    logger.configure(dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "progress.json"]


def test_default_formats_are_stdout_log_csv(tmp_path, capsys):
    logger.configure(dir=str(tmp_path))
    logger.logkv("x", 1)
    logger.dumpkvs()
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "progress.csv"]
    assert "| x" in capsys.readouterr().out


def test_rank_above_zero_logs_only_to_a_suffixed_text_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMI_RANK", "2")
    assert logger.get_rank_without_mpi_import() == 2
    logger.configure(dir=str(tmp_path))
    logger.logkv("x", 1)
    logger.dumpkvs()
    assert os.listdir(tmp_path) == ["log-rank002.txt"]
    assert capsys.readouterr().out == ""


def test_rank_above_zero_uses_openai_log_format_mpi(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("OPENAI_LOG_FORMAT_MPI", "csv,json")
    logger.configure(dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["progress-rank001.csv", "progress-rank001.json"]


def test_scoped_configure_restores_the_previous_logger(tmp_path):
    logger.configure(dir=str(tmp_path / "outer"), format_strs=["csv"])
    outer = logger.Logger.CURRENT
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["csv"]):
        assert logger.get_dir() == str(tmp_path / "inner")
        logger.logkv("inner", 1)
        logger.dumpkvs()
    assert logger.Logger.CURRENT is outer
    assert logger.get_dir() == str(tmp_path / "outer")
    logger.logkv("outer", 2)
    logger.dumpkvs()
    assert read(tmp_path / "inner" / "progress.csv") == "inner\n1\n"
    assert read(tmp_path / "outer" / "progress.csv") == "outer\n2\n"


def test_reset_closes_the_configured_logger_and_returns_to_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "default"))
    default_dir = logger.get_dir()  # first use configures the default logger
    logger.configure(dir=str(tmp_path / "custom"), format_strs=["json"])
    custom = logger.Logger.CURRENT
    logger.reset()
    assert logger.get_dir() == default_dir
    assert custom.output_formats[0].file.closed


def test_unknown_format_names_it_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"'xml'.*stdout, log, csv, json, tensorboard"):
        logger.configure(dir=str(tmp_path), format_strs=["xml"])


def test_tensorboard_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        logger.configure(dir=str(tmp_path), format_strs=["tensorboard"])


def test_weighted_mean_weights_logkv_mean_values_by_their_counts():
    gathered = [
        {"loss": (1.0, 1), "step": (5, 0), "name": ("a", 0)},
        {"loss": (4.0, 3), "step": (5, 0), "name": ("b", 0), "only1": (2.0, 2)},
    ]
    assert logger.weighted_mean(gathered) == {"loss": 3.25, "step": 5, "name": "a", "only1": 2.0}


RANK_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from guided_diffusion import logger

    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    logger.configure(dir=sys.argv[1])
    # rank 0 logs one value, rank 1 logs three: the mean is over all four.
    for value in ([2.0] if rank == 0 else [4.0, 6.0, 8.0]):
        logger.logkv_mean("loss", value)
    logger.logkv("rank", rank)
    print(json.dumps(logger.dumpkvs()))
    dist.destroy_process_group()
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters importing torch
def test_two_ranks_average_logkv_mean_by_counts(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(RANK_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs")], env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1] == {"loss": 5.0, "rank": 0}
    assert sorted(os.listdir(tmp_path / "logs")) == ["log-rank001.txt", "log.txt", "progress.csv"]
    assert read(tmp_path / "logs" / "progress.csv") == "loss,rank\n5.0,0\n"


def test_csv_quotes_cells_with_commas_and_keeps_them_through_a_header_rewrite(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    logger.logkv("note", 'a, "b"')
    logger.dumpkvs()
    logger.logkv("x", 1)
    logger.dumpkvs()
    assert read(tmp_path / "progress.csv") == 'note,x\n"a, ""b""",\n,1\n'


def test_tensorboard_writes_event_files_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    logger.configure(dir=str(tmp_path), format_strs=["tensorboard"])
    logger.logkv("loss", 0.5)
    logger.logkv("name", "text values are skipped")
    logger.dumpkvs()
    logger.reset()
    events = os.listdir(tmp_path / "tb")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")


MPI_WORKER = textwrap.dedent(
    """
    import json, sys
    from mpi4py import MPI
    from guided_diffusion import logger

    comm = MPI.COMM_WORLD
    logger.configure(dir=sys.argv[1], comm=comm)
    for value in ([2.0] if comm.rank == 0 else [4.0, 6.0, 8.0]):
        logger.logkv_mean("loss", value)
    logger.logkv("rank", comm.rank)
    print(json.dumps(logger.dumpkvs()))
    """
)


def test_mpi_communicator_averages_logkv_mean_by_counts(tmp_path):
    pytest.importorskip("mpi4py")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("no mpiexec beside the python executable (pip install mpich)")
    script = tmp_path / "worker.py"
    script.write_text(MPI_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), str(tmp_path / "logs")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Both ranks print to one forwarded stdout, so their lines may arrive glued together.
    rows = [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", done.stdout)]
    assert rows == [{"loss": 5.0, "rank": 0}] * 2
    assert read(tmp_path / "logs" / "progress.csv") == "loss,rank\n5.0,0\n"
    assert os.path.isfile(tmp_path / "logs" / "log-rank001.txt")


def test_stdout_output_follows_later_redirections_of_sys_stdout(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["stdout"])
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        logger.log("redirected", 1)
    assert captured.getvalue() == "redirected 1\n"


def test_original_output_class_names_write_to_open_streams_without_closing_them(tmp_path):
    stream = io.StringIO()
    human = logger.HumanOutputFormat(stream)
    assert isinstance(human, logger.KVWriter) and isinstance(human, logger.SeqWriter)
    logger.configure(dir=str(tmp_path), format_strs=[])
    logger.get_current().output_formats.append(human)
    logger.log("hello", 2)
    logger.logkv("loss", 0.5)
    logger.dumpkvs()
    logger.get_current().close()
    assert not stream.closed
    assert stream.getvalue().startswith("hello 2\n") and "| loss | 0.5" in stream.getvalue()
    assert logger.CSVOutputFormat is logger.CSVOutput and logger.JSONOutputFormat is logger.JSONOutput
    assert issubclass(logger.TensorBoardOutputFormat, logger.KVWriter)


def test_profile_kv_adds_the_time_spent_to_a_wait_diagnostic(tmp_path, monkeypatch):
    clock = iter([10.0, 10.25, 20.0, 20.5])
    monkeypatch.setattr(logger.time, "perf_counter", lambda: next(clock))
    logger.configure(dir=str(tmp_path), format_strs=[])

    @logger.profile("data")
    def load():
        return "batch"

    with logger.profile_kv("data"):
        pass
    assert load() == "batch"
    assert logger.getkvs() == {"wait_data": 0.75}


def test_mpi_weighted_mean_is_the_count_weighted_mean_on_rank_zero_only():
    class Comm:
        def __init__(self, rank):
            self.rank = rank

        def gather(self, local):
            return [{"loss": (1.0, 1), "acc": (0.5, 3)}, local]

        def Get_rank(self):
            return self.rank

    local = {"loss": (4.0, 2), "acc": (0.9, 1)}
    assert logger.mpi_weighted_mean(Comm(0), local) == pytest.approx({"loss": 3.0, "acc": 0.6})
    assert logger.mpi_weighted_mean(Comm(1), local) == {}
