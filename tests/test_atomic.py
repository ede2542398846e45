"""atomic: a write either replaces the file completely or leaves it as it was."""

import os

import numpy as np
import pytest
import torch

from guided_diffusion import atomic


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    atomic.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def write_half_then_fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_save_round_trips_through_torch_load(tmp_path):
    path = tmp_path / "w.pt"
    atomic.atomic_save({"w": torch.arange(3.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3.0))


def test_write_text_is_utf8(tmp_path):
    path = tmp_path / "note.txt"
    atomic.atomic_write_text(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode("utf-8")


def test_savez_writes_an_npz_that_loads_without_pickle(tmp_path):
    path = tmp_path / "samples.npz"
    atomic.atomic_savez(path, arr_0=np.arange(6, dtype=np.uint8).reshape(2, 3), arr_1=np.array([4, 7]))
    with np.load(path, allow_pickle=False) as data:
        assert data["arr_0"].tolist() == [[0, 1, 2], [3, 4, 5]]
        assert data["arr_1"].tolist() == [4, 7]
    assert os.listdir(tmp_path) == ["samples.npz"]


def test_savez_refuses_object_arrays_and_writes_nothing(tmp_path):
    path = tmp_path / "samples.npz"
    with pytest.raises(TypeError, match="labels.*pickled"):
        atomic.atomic_savez(path, images=np.zeros(2), labels=np.array([1, "a", None], dtype=object))
    assert os.listdir(tmp_path) == []
