"""Specification of guided_diffusion.image_datasets beyond the golden fixtures:
labels, pixel conversions, sharding, crops and flips, and the errors users meet."""

import json
import multiprocessing
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import image_datasets as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """Tests run as one process unless they set launcher variables themselves."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


def rgb(seed, width, height):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8), "RGB")


def solid(color, size=8, mode="RGB"):
    return Image.new(mode, (size, size), color)


def save(image, folder, name):
    path = os.path.join(str(folder), *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return path


def loader(folder, **kwargs):
    args = dict(data_dir=str(folder), batch_size=2, image_size=8, deterministic=True, random_flip=False,
                num_workers=0)
    args.update(kwargs)
    return D.load_data(**args)


# ----------------------------------------------------------------------------- files and labels


def test_listing_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ["b_1.PNG", "a_2.jpeg", "sub/c_3.Gif", "sub/z.jpg"]:
        save(rgb(0, 4, 4), tmp_path, name)
    for name in ["notes.txt", "noext", "sub/x.png.bak"]:
        (tmp_path / name).write_text("not an image")
    found = [os.path.relpath(p, tmp_path) for p in D._list_image_files_recursively(str(tmp_path))]
    assert found == ["a_2.jpeg", "b_1.PNG", os.path.join("sub", "c_3.Gif"), os.path.join("sub", "z.jpg")]


def test_labels_are_prefixes_before_the_first_underscore_numbered_in_sorted_order():
    paths = ["/d/zebra_1.png", "/d/sub/cat_x_2.png", "/d/ant_3.png", "/d/cat_4.png", "/d/plain.png"]
    assert D.class_labels(paths) == [3, 1, 0, 1, 2]  # ant, cat, plain.png, zebra


def test_class_cond_batches_carry_the_prefix_labels(tmp_path):
    for name in ["dog_1.png", "cat_1.png", "dog_2.png", "emu_1.png"]:
        save(rgb(1, 10, 10), tmp_path, name)
    batches = loader(tmp_path, class_cond=True)
    ys = [next(batches)[1]["y"] for _ in range(2)]
    assert [y.dtype for y in ys] == [torch.int64, torch.int64]
    assert torch.cat(ys).tolist() == [0, 1, 1, 2]  # cat_1, dog_1, dog_2, emu_1


def test_unconditional_batches_have_an_empty_cond_dict(tmp_path):
    for i in range(2):
        save(rgb(i, 10, 10), tmp_path, f"img_{i}.png")
    _, cond = next(loader(tmp_path))
    assert cond == {}


def test_batches_are_nchw_float32_in_minus_one_to_one(tmp_path):
    save(solid((0, 255, 51), 12), tmp_path, "a.png")
    save(rgb(3, 20, 30), tmp_path, "b.png")
    x, _ = next(loader(tmp_path, image_size=8))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def test_deterministic_loading_repeats_the_same_order_every_epoch(tmp_path):
    for i in range(4):
        save(solid((i * 60, 0, 0)), tmp_path, f"c{i}.png")
    batches = loader(tmp_path, batch_size=2)
    reds = [next(batches)[0][:, 0, 0, 0].tolist() for _ in range(4)]
    assert reds[:2] == reds[2:]
    assert [v for batch in reds[:2] for v in batch] == pytest.approx([i * 60 / 127.5 - 1 for i in range(4)])


def test_shuffled_epochs_visit_every_image_once(tmp_path):
    for i in range(6):
        save(solid((i * 40, 0, 0)), tmp_path, f"c{i}.png")
    torch.manual_seed(0)
    batches = loader(tmp_path, batch_size=3, deterministic=False)
    epoch = torch.cat([next(batches)[0][:, 0, 0, 0] for _ in range(2)])
    assert sorted(epoch.tolist()) == pytest.approx([i * 40 / 127.5 - 1 for i in range(6)])


# ----------------------------------------------------------------------------- sharding


def test_shards_partition_the_files():
    paths = [f"img_{i}.png" for i in range(11)]
    shards = [D.ImageDataset(8, paths, shard=s, num_shards=3).local_images for s in range(3)]
    assert sorted(sum(shards, [])) == sorted(paths)
    assert shards[1] == ["img_1.png", "img_4.png", "img_7.png", "img_10.png"]


def test_shards_keep_labels_aligned_with_their_files():
    paths = [f"c{i % 3}_{i}.png" for i in range(9)]
    ds = D.ImageDataset(8, paths, classes=D.class_labels(paths), shard=2, num_shards=4)
    assert ds.local_images == ["c2_2.png", "c0_6.png"]
    assert ds.local_classes == [2, 0]


def test_load_data_reads_the_shard_of_the_launcher_rank(tmp_path, monkeypatch):
    for i in range(4):
        save(solid((i * 60, 0, 0)), tmp_path, f"c{i}.png")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    x, _ = next(loader(tmp_path, batch_size=2))
    assert x[:, 0, 0, 0].tolist() == pytest.approx([60 / 127.5 - 1, 180 / 127.5 - 1])


# ----------------------------------------------------------------------------- pixel conversions


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    levels = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(levels), tmp_path, "deep.png")
    arr = np.asarray(D.read_image(path))
    assert arr.shape == (1, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 3, 128, 255]
    assert (arr == arr[..., :1]).all()


def _png_bytes(pixels, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): ``pixels`` is HxWxC uint16."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_sixteen_bit_rgb_png_keeps_its_full_range(tmp_path):
    path = tmp_path / "deep_rgb.png"
    path.write_bytes(_png_bytes(np.array([[[0, 1000, 65535], [32768, 65535, 0]]], dtype=np.uint16), color_type=2))
    arr = np.asarray(D.read_image(str(path)))
    assert arr.tolist() == [[[0, 3, 255], [128, 255, 0]]]


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path, "alpha.png")
    arr = np.asarray(D.read_image(path)).astype(int)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [0, 0, 255]
    assert np.abs(arr[0, 2] - 127).max() <= 1


def test_palette_transparency_is_composited_onto_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    image.save(path, transparency=1)
    arr = np.asarray(D.read_image(str(path)))
    assert arr[0].tolist() == [[10, 20, 30], [255, 255, 255]]


def test_grayscale_images_become_three_equal_channels(tmp_path):
    path = save(Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), "L"), tmp_path, "g.png")
    arr = np.asarray(D.read_image(path))
    assert arr.tolist() == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_in_channels_one_gives_single_channel_luma_batches(tmp_path):
    save(solid((255, 0, 0), 8), tmp_path, "red.png")
    save(solid((0, 0, 255), 8), tmp_path, "blue.png")
    x, _ = next(loader(tmp_path, in_channels=1))
    assert x.shape == (2, 1, 8, 8)
    luma = torch.tensor([29, 76]) / 127.5 - 1  # ITU-R 601 luma of pure blue, pure red
    assert torch.allclose(x[:, 0, 0, 0], luma)


def test_in_channels_must_be_one_or_three(tmp_path):
    save(rgb(0, 8, 8), tmp_path, "a.png")
    with pytest.raises(ValueError, match="in_channels must be 1 .* or 3 .*got 4"):
        loader(tmp_path, batch_size=1, in_channels=4)


# ----------------------------------------------------------------------------- crops and flips


def test_center_crop_of_an_exact_size_image_is_the_image():
    image = rgb(5, 16, 16)
    assert np.array_equal(D.center_crop_arr(image, 16), np.asarray(image))


def test_center_crop_takes_the_middle_of_the_long_side():
    image = rgb(6, 24, 16)
    assert np.array_equal(D.center_crop_arr(image, 16), np.asarray(image)[:, 4:20])


def test_random_crop_is_a_window_of_the_resized_image_and_draws_three_numbers():
    image = rgb(7, 40, 30)
    random.seed(3)
    crop = D.random_crop_arr(image, 20)
    after = random.random()
    random.seed(3)
    side = random.randrange(20, 26)  # ceil(20 / 1.0) .. ceil(20 / 0.8)
    resized = np.asarray(D._fit_shorter_side(image, side))
    top, left = random.randrange(resized.shape[0] - 19), random.randrange(resized.shape[1] - 19)
    assert random.random() == after
    assert crop.shape == (20, 20, 3)
    assert np.array_equal(crop, resized[top:top + 20, left:left + 20])


def test_random_flip_mirrors_some_items_and_leaves_the_rest(tmp_path):
    path = save(rgb(8, 8, 8), tmp_path, "a.png")
    plain, _ = D.ImageDataset(8, [path], random_flip=False)[0]
    flipping = D.ImageDataset(8, [path], random_flip=True)
    random.seed(0)
    items = [flipping[0][0] for _ in range(20)]
    mirrored = [np.array_equal(x, plain[:, :, ::-1]) for x in items]
    assert all(m or np.array_equal(x, plain) for m, x in zip(mirrored, items))
    assert 0 < sum(mirrored) < 20


# ----------------------------------------------------------------------------- errors


def test_empty_data_dir_argument_names_the_flag():
    with pytest.raises(ValueError, match="--data_dir"):
        D.load_data(data_dir="", batch_size=1, image_size=8)


def test_missing_data_dir_names_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"nope.*--data_dir"):
        D.load_data(data_dir=missing, batch_size=1, image_size=8)


def test_folder_without_images_names_the_path_and_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"no images found in data directory '{tmp_path}'.*\.png"):
        D.load_data(data_dir=str(tmp_path), batch_size=1, image_size=8)


def test_shard_smaller_than_the_batch_names_the_numbers(tmp_path, monkeypatch):
    for i in range(5):
        save(rgb(i, 8, 8), tmp_path, f"a{i}.png")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"process 1 of 2 gets 2 of the 5 images.*batch of 4.*--batch_size"):
        loader(tmp_path, batch_size=4)


def test_non_positive_batch_size_is_refused(tmp_path):
    save(rgb(0, 8, 8), tmp_path, "a.png")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        loader(tmp_path, batch_size=0)


def _corrupt_folder(tmp_path):
    save(solid((0, 0, 0)), tmp_path, "a_good.png")
    full = save(rgb(1, 32, 32), tmp_path, "b_truncated.png")
    with open(full, "rb") as f:
        data = f.read()
    with open(full, "wb") as f:
        f.write(data[: len(data) // 2])
    (tmp_path / "c_garbage.jpg").write_bytes(b"this is not a jpeg")
    save(solid((255, 255, 255)), tmp_path, "d_good.png")


@pytest.mark.parametrize("name", ["b_truncated.png", "c_garbage.jpg"])
def test_unreadable_image_error_names_its_path(tmp_path, name):
    _corrupt_folder(tmp_path)
    with pytest.raises(D.BadImageError, match=rf"{name}.*--skip_bad_images"):
        D.read_image(str(tmp_path / name))


def test_unreadable_image_in_a_worker_process_names_its_path_and_stops_the_worker(tmp_path):
    _corrupt_folder(tmp_path)
    batches = loader(tmp_path, batch_size=4, num_workers=1)
    with pytest.raises(D.BadImageError, match="b_truncated.png"):
        next(batches)
    assert multiprocessing.active_children() == []


def test_skip_bad_images_warns_and_yields_only_readable_images(tmp_path):
    _corrupt_folder(tmp_path)
    batches = loader(tmp_path, batch_size=4, skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipping unreadable image") as record:
        x, _ = next(batches)
    assert sorted(os.path.basename(str(w.message).split()[3]) for w in record) == ["b_truncated.png", "c_garbage.jpg"]
    # a_good, then d_good in place of both bad files, then d_good itself
    assert x[:, 0, 0, 0].tolist() == [-1.0, 1.0, 1.0, 1.0]


def test_skip_bad_images_fails_when_no_image_is_readable(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    ds = D.ImageDataset(8, [str(tmp_path / "bad.png")], skip_bad_images=True)
    with pytest.warns(UserWarning), pytest.raises(D.BadImageError, match="none of the 1 images"):
        ds[0]


SHARD_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from guided_diffusion.image_datasets import load_data

    dist.init_process_group("gloo", init_method="env://")
    batches = load_data(data_dir=sys.argv[1], batch_size=2, image_size=8, deterministic=True,
                        random_flip=False, num_workers=0)
    print(json.dumps(next(batches)[0][:, 0, 0, 0].tolist()))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # two fresh interpreters importing torch
def test_each_torch_distributed_rank_reads_its_own_shard(tmp_path):
    for i in range(4):
        save(solid((i * 60, 0, 0)), tmp_path / "imgs", f"c{i}.png")
    script = tmp_path / "worker.py"
    script.write_text(SHARD_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "imgs")], env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    reds = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert reds == [pytest.approx([v / 127.5 - 1 for v in values]) for values in ([0, 120], [60, 180])]
