"""Specification of checkpoint I/O: safe reading, atomic writing, configs saved
beside checkpoints, and the error for weights that do not fit the flags."""

import io
import json
import os

import pytest
import torch

from guided_diffusion import checkpoints as ck
from guided_diffusion import script_util as su

SMALL = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
             num_heads=2, learn_sigma=True, class_cond=False)


def small_model(**overrides):
    flags = dict(SMALL, **overrides)
    return su.create_model(**flags), flags


def tiny_state():
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0])}


# ---------------------------------------------------------------- reading


class RunsShell:
    """Unpickling this calls os.system: the attack weights_only=True must block."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": RunsShell(marker)}, path)
    with pytest.raises(ck.CheckpointError, match="refused.*would run code.*weights_only=False") as info:
        ck.load_checkpoint_file(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_refused_pickle_from_bytes_names_the_source(tmp_path):
    buf = io.BytesIO()
    torch.save(RunsShell(tmp_path / "pwned"), buf)
    with pytest.raises(ck.CheckpointError, match="remote/model.pt"):
        ck.load_checkpoint_bytes(buf.getvalue(), "remote/model.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_torch_checkpoint_round_trip(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    ck.atomic_save(tiny_state(), path)
    loaded = ck.load_checkpoint_file(path)
    assert set(loaded) == {"w", "b"}
    assert torch.equal(loaded["w"], tiny_state()["w"]) and torch.equal(loaded["b"], tiny_state()["b"])


def test_safetensors_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors.save_file(tiny_state(), str(path))
    loaded = ck.load_checkpoint_file(path)
    assert torch.equal(loaded["w"], tiny_state()["w"]) and torch.equal(loaded["b"], tiny_state()["b"])


def test_safetensors_bytes_are_recognised_without_the_suffix(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    data = safetensors.save(tiny_state())
    loaded = ck.load_checkpoint_bytes(data, "weights.bin")
    assert torch.equal(loaded["w"], tiny_state()["w"])


def test_missing_safetensors_package_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(ck.CheckpointError, match="pip install safetensors"):
        ck.load_checkpoint_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "m.safetensors")


def test_missing_file_names_the_path_and_the_flag(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(ck.CheckpointError, match="--model_path") as info:
        ck.load_checkpoint_file(path, flag="--model_path")
    assert str(path) in str(info.value) and "no such file" in str(info.value)


def test_folder_instead_of_file_is_explained(tmp_path):
    with pytest.raises(ck.CheckpointError, match="folder"):
        ck.load_checkpoint_file(tmp_path)


def test_corrupt_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match="broken.pt"):
        ck.load_checkpoint_file(path)


# ---------------------------------------------------------------- atomic writing


def test_failed_save_leaves_the_old_file_intact_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    ck.atomic_save(tiny_state(), path)
    before = path.read_bytes()

    def half_write_then_crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save({"w": torch.ones(3)}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_atomic_save_replaces_the_file(tmp_path):
    path = tmp_path / "model.pt"
    ck.atomic_save({"x": torch.zeros(1)}, path)
    ck.atomic_save({"x": torch.ones(1)}, path)
    assert ck.load_checkpoint_file(path)["x"].item() == 1.0
    assert os.listdir(tmp_path) == ["model.pt"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "note.txt"
    ck.atomic_write_text(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"


# ---------------------------------------------------------------- saved configs


def test_config_round_trip_keeps_types(tmp_path):
    flags = {"image_size": 16, "dropout": 0.1, "learn_sigma": True, "channel_mult": "1,2", "maybe": None}
    ck.save_config(tmp_path, flags)
    (tmp_path / "model000100.pt").write_bytes(b"")
    assert ck.find_config(tmp_path / "model000100.pt") == flags


def test_checkpoint_stem_config_is_preferred(tmp_path):
    ck.save_config(tmp_path, {"num_channels": 1})
    ck.save_config(tmp_path, {"num_channels": 2}, name="ema_0.9999_000100.json")
    assert ck.find_config(tmp_path / "ema_0.9999_000100.pt") == {"num_channels": 2}
    assert ck.find_config(tmp_path / "model000100.pt") == {"num_channels": 1}


def test_no_config_gives_none(tmp_path):
    assert ck.find_config(tmp_path / "model.pt") is None


def test_unserialisable_flag_is_refused_with_its_name(tmp_path):
    with pytest.raises(TypeError, match="'betas'"):
        ck.save_config(tmp_path, {"betas": torch.zeros(2)})


def test_broken_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="config.json"):
        ck.find_config(tmp_path / "model.pt")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ck.CheckpointError, match="JSON object"):
        ck.find_config(tmp_path / "model.pt")


def test_checkpoint_saved_with_its_config_reloads_with_no_flags(tmp_path):
    flags = dict(su.model_and_diffusion_defaults(), **su.model_extra_defaults())
    flags.update(SMALL, class_cond=True, num_classes=10, in_channels=1, use_scale_shift_norm=False)
    model, _ = su.create_model_and_diffusion(**flags)
    path = tmp_path / "model000010.pt"
    ck.atomic_save(model.state_dict(), path)
    ck.save_config(tmp_path, flags)

    parser = __import__("argparse").ArgumentParser()
    defaults = dict(su.model_and_diffusion_defaults(), **su.model_extra_defaults(), model_path="")
    su.add_dict_to_argparser(parser, defaults)
    args = su.parse_args_with_presets(parser, ["--model_path", str(path)])
    rebuilt, _ = su.create_model_and_diffusion(
        **su.args_to_dict(args, [*su.model_and_diffusion_defaults(), *su.model_extra_defaults()])
    )
    ck.load_model_weights(rebuilt, ck.load_checkpoint_file(path), source=str(path))
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor([3]), torch.tensor([7])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, t, y), model.eval()(x, t, y))


# ---------------------------------------------------------------- mismatch diagnosis


def _mismatch(checkpoint_flags, model_flags):
    source, _ = small_model(**checkpoint_flags)
    target, flags = small_model(**model_flags)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_model_weights(target, source.state_dict(), flags=flags, source="ckpt.pt")
    return str(info.value)


def test_width_mismatch_names_the_right_num_channels():
    message = _mismatch({"num_channels": 64}, {"num_channels": 32})
    assert "ckpt.pt" in message
    assert "mis-shaped keys" in message
    assert "--num_channels 64 (you gave 32)" in message


def test_learn_sigma_mismatch_is_named():
    message = _mismatch({"learn_sigma": False}, {"learn_sigma": True})
    assert "out.2.weight: checkpoint [3, 32, 3, 3], model [6, 32, 3, 3]" in message
    assert "--learn_sigma False (you gave True)" in message


def test_class_cond_mismatch_lists_the_unexpected_label_embedding():
    message = _mismatch({"class_cond": True}, {"class_cond": False})
    assert "unexpected keys (1)" in message and "label_emb.weight" in message
    assert "--class_cond True (you gave False)" in message and "--num_classes 1000" in message


def test_structure_mismatch_names_num_res_blocks_attention_and_channel_mult():
    message = _mismatch(
        {"num_res_blocks": 2, "attention_resolutions": "16,8", "channel_mult": "1,1"},
        {"num_res_blocks": 1, "attention_resolutions": "8", "channel_mult": "1,2"},
    )
    assert "missing keys" in message and "unexpected keys" in message
    for hint in ("--num_res_blocks 2 (you gave 1)", "--attention_resolutions 16,8 (you gave 8)",
                 "--channel_mult 1,1 (you gave 1,2)"):
        assert hint in message


def test_scale_shift_and_resblock_updown_mismatch_are_named():
    message = _mismatch({"use_scale_shift_norm": False, "resblock_updown": True},
                        {"use_scale_shift_norm": True, "resblock_updown": False})
    assert "--use_scale_shift_norm False (you gave True)" in message
    assert "--resblock_updown True (you gave False)" in message


def test_error_says_which_flags_cannot_be_inferred():
    message = _mismatch({"num_channels": 64}, {"num_channels": 32})
    assert "use_new_attention_order" in message and "num_head_channels" in message


def test_ddp_prefix_gets_a_hint():
    model, flags = small_model()
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ck.CheckpointError, match="'module.'"):
        ck.load_model_weights(model, wrapped, flags=flags)


def test_fitting_weights_load_strictly():
    source, _ = small_model()
    target, flags = small_model()
    ck.load_model_weights(target, source.state_dict(), flags=flags)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_without_image_size_attention_is_reported_as_downsampling_rates():
    model, _ = small_model(attention_resolutions="16,8")
    inferred = ck.infer_model_flags(model.state_dict())
    assert inferred["attention_ds"] == "1,2"
    assert "attention_resolutions" not in inferred


def test_super_res_and_classifier_are_recognised():
    sr = su.sr_create_model(32, 16, 32, 1, True, True, False, "8", 2, -1, -1, True, 0.0, False, False,
                            num_classes=5)
    inferred = ck.infer_model_flags(sr.state_dict(), image_size=32)
    assert inferred["kind"] == "super-res" and inferred["in_channels"] == 3 and inferred["learn_sigma"] is True
    assert inferred["num_classes"] == 5
    clf = su.create_classifier(16, False, 64, 1, "8", True, False, "attention", num_classes=4)
    inferred = ck.infer_model_flags(clf.state_dict())
    assert inferred["kind"] == "classifier"
    assert (inferred["classifier_width"], inferred["num_classes"], inferred["classifier_pool"]) == (64, 4, "attention")
    assert inferred["classifier_resblock_updown"] is False


@pytest.mark.parametrize("pool", ["adaptive", "spatial", "spatial_v2"])
def test_classifier_pool_is_recognised(pool):
    with torch.device("meta"):
        clf = su.create_classifier(16, False, 64, 1, "8", True, True, pool, num_classes=4)
    inferred = ck.infer_model_flags(clf.state_dict())
    assert inferred["classifier_pool"] == pool and inferred["num_classes"] == 4


def test_json_dump_of_saved_config_is_readable(tmp_path):
    path = ck.save_config(tmp_path, {"a": 1})
    assert json.loads(open(path).read()) == {"a": 1}
