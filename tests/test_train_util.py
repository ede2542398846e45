"""TrainLoop: checkpoint schedule, exact resume, NaN stop, max_steps, and the checkpoint-set helpers."""

import os
import random

import numpy as np
import pytest
import torch

from guided_diffusion import dist_util, logger, train_util
from guided_diffusion.fp16_util import TrainingDivergedError
from guided_diffusion.script_util import create_gaussian_diffusion, create_model

torch.set_num_threads(1)


def tiny_model(num_classes=None):
    torch.manual_seed(0)
    return create_model(8, 32, 1, channel_mult="1", attention_resolutions="8", num_heads=2, learn_sigma=True,
                        dropout=0.1, class_cond=num_classes is not None, num_classes=num_classes or 1000)


def fixed_batches(n=3, batch=2, seed=0, num_classes=None):
    rs = np.random.RandomState(seed)

    def cond():
        return {} if num_classes is None else {"y": torch.from_numpy(rs.randint(0, num_classes, batch))}

    batches = [(torch.from_numpy(rs.uniform(-1, 1, (batch, 3, 8, 8)).astype(np.float32)), cond()) for _ in range(n)]

    def gen():
        i = 0
        while True:
            yield batches[i % n]
            i += 1

    return gen()


def make_loop(log_dir, *, steps=0, max_steps=0, save_interval=2, resume="", diffusion=None, num_classes=None, **kw):
    logger.configure(dir=str(log_dir), format_strs=["log", "csv"])
    return train_util.TrainLoop(
        model=tiny_model(num_classes),
        diffusion=diffusion or create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine"),
        data=fixed_batches(num_classes=num_classes),
        batch_size=2,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=1,
        save_interval=save_interval,
        resume_checkpoint=resume,
        lr_anneal_steps=steps,
        max_steps=max_steps,
        **kw,
    )


@pytest.fixture(autouse=True)
def _process_group():
    dist_util.setup_dist()
    yield
    logger.reset()


def ckpt_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".pt"))


def same_file(a, b):
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if "state" in x and "param_groups" in x:
        return x["param_groups"] == y["param_groups"] and all(
            torch.equal(x["state"][k][n], y["state"][k][n]) for k in x["state"] for n in x["state"][k]
        )
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_saves_at_zero_every_interval_and_at_the_end(tmp_path):
    train_util.seed_all(1)
    make_loop(tmp_path, steps=3, save_interval=2).run_loop()
    names = {f[: -len(".pt")] for f in ckpt_files(tmp_path)}
    assert names == {
        f"{kind}{s:06d}" if kind else f"ema_{r}_{s:06d}"
        for s in (0, 2)
        for kind, r in [("model", None), ("opt", None), ("state", None), ("", 0.9), ("", 0.99)]
    }
    train_util.seed_all(1)
    make_loop(tmp_path / "b", steps=3, save_interval=10).run_loop()
    assert {f for f in ckpt_files(tmp_path / "b") if f.startswith("model")} == {"model000000.pt", "model000003.pt"}


def test_max_steps_stops_without_lr_anneal(tmp_path):
    train_util.seed_all(2)
    loop = make_loop(tmp_path, max_steps=2, save_interval=100)
    loop.run_loop()
    assert loop.step == 2
    assert "model000002.pt" in ckpt_files(tmp_path)


@pytest.mark.parametrize("labels", [{}, {"num_classes": 4, "class_dropout_prob": 0.5}], ids=["uncond", "label_dropout"])
def test_exact_resume_is_bit_identical(tmp_path, labels):
    train_util.seed_all(3)
    make_loop(tmp_path / "straight", max_steps=4, **labels).run_loop()
    train_util.seed_all(3)
    make_loop(tmp_path / "half", max_steps=2, save_interval=1, **labels).run_loop()
    torch.manual_seed(999)  # a different global RNG state must not matter: it is restored
    np.random.seed(999)
    random.seed(999)
    resumed = tmp_path / "half" / "opt000001.pt"  # any file of the set names it
    make_loop(tmp_path / "half", max_steps=4, save_interval=100, resume=str(resumed), **labels).run_loop()
    for name in ("model000004.pt", "ema_0.9_000004.pt", "ema_0.99_000004.pt", "opt000004.pt"):
        assert same_file(tmp_path / "straight" / name, tmp_path / "half" / name), name


def test_label_dropout_replaces_that_share_of_labels_by_minus_one_per_step(tmp_path):
    loop = make_loop(tmp_path, num_classes=4, class_dropout_prob=0.25, seed=7)
    labels = torch.arange(4).repeat(500)
    first = loop._drop_labels(labels, 0)
    dropped = first == -1
    assert torch.equal(first[~dropped], labels[~dropped])
    assert 0.2 < dropped.float().mean() < 0.3
    assert torch.equal(loop._drop_labels(labels, 0), first)  # a function of (seed, step, rank, offset)
    assert not torch.equal(loop._drop_labels(labels, 2), first)
    loop.step += 1
    assert not torch.equal(loop._drop_labels(labels, 0), first)


def test_label_dropout_outside_zero_to_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--class_dropout_prob must be in \\[0, 1\\)"):
        make_loop(tmp_path, num_classes=4, class_dropout_prob=1.0)


def test_set_without_state_file_is_refused_unless_partial_resume_is_allowed(tmp_path):
    train_util.seed_all(4)
    make_loop(tmp_path / "a", steps=3).run_loop()
    os.remove(tmp_path / "a" / "state000002.pt")
    with pytest.raises(FileNotFoundError, match=r"incomplete \(no state000002\.pt\).*newest complete set there is "
                                                r".*model000000\.pt.*--allow_partial_resume True"):
        make_loop(tmp_path / "b", steps=3, resume=str(tmp_path / "a" / "model000002.pt"))
    loop = make_loop(tmp_path / "b", steps=3, resume=str(tmp_path / "a" / "model000002.pt"),
                     allow_partial_resume=True)
    assert loop.resume_step == 2
    loop.run_loop()
    assert loop.step == 1


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    base = create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
    calls = {"n": 0}
    original = base.training_losses

    def poisoned(model, x_start, t, model_kwargs=None, noise=None):
        calls["n"] += 1
        out = original(model, x_start, t, model_kwargs=model_kwargs, noise=noise)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    base.training_losses = poisoned
    loop = make_loop(tmp_path, max_steps=10, save_interval=1, diffusion=base)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 2.*model000001\.pt"):
        loop.run_loop()
    assert train_util.find_latest_checkpoint(str(tmp_path)).endswith("model000001.pt")
    state = torch.load(tmp_path / "model000001.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_resume_target_resolution(tmp_path):
    for name in ("model000004.pt", "ema_0.999_000004.pt", "opt000004.pt", "state000004.pt", "model000006.pt"):
        (tmp_path / name).write_bytes(b"x")
    expected = str(tmp_path / "model000004.pt")
    for name in ("ema_0.999_000004.pt", "opt000004.pt", "state000004.pt", "model000004.pt"):
        assert train_util.resolve_resume_checkpoint(str(tmp_path / name)) == expected
    # model000006 has no state file: it is an incomplete set, the folder resolves to 4
    assert train_util.resolve_resume_checkpoint(str(tmp_path)) == expected
    with pytest.raises(FileNotFoundError, match="model000009.pt"):
        train_util.resolve_resume_checkpoint(str(tmp_path / "opt000009.pt"))


def test_folder_of_original_checkpoints_resolves_to_newest_model(tmp_path):
    for name in ("model000100.pt", "model002000.pt", "opt002000.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert train_util.find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "model002000.pt")


def test_isolated_data_stream_ignores_global_draws():
    def draws():
        while True:
            yield torch.rand(2), np.random.rand(), random.random()

    a = train_util.IsolatedRNGIterator(draws(), seed=7)
    b = train_util.IsolatedRNGIterator(draws(), seed=7)
    first = next(a)
    torch.rand(100)
    np.random.rand(5)
    second = next(a)
    assert torch.equal(next(b)[0], first[0]) and torch.equal(next(b)[0], second[0])
    outer = torch.get_rng_state()
    next(a)
    assert torch.equal(torch.get_rng_state(), outer)


def test_rng_state_round_trip():
    train_util.seed_all(5)
    state = train_util.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.rand(10), np.random.rand(10), random.random()
    train_util.restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_bad_ema_rate_is_named():
    with pytest.raises(ValueError, match="ema_rate.*'0.9;0.99'"):
        train_util._parse_ema_rates("0.9;0.99")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_loss_dict_logs_means_and_quartile_means_in_one_transfer(tmp_path, dtype):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    diffusion = create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
    ts = torch.tensor([0, 4, 5, 9, 10, 14, 15, 19, 3])
    gen = torch.Generator().manual_seed(0)
    losses = {"loss": torch.rand(9, generator=gen, dtype=dtype), "mse": torch.rand(9, generator=gen, dtype=dtype)}
    extra = torch.tensor(2.5)
    host = train_util._log_losses(diffusion, ts, losses, extra=(extra,))
    np.testing.assert_array_equal(host, [2.5])
    kvs = logger.getkvs()
    quartile = (4 * ts // 20).numpy()
    for key, values in losses.items():
        assert kvs[key] == pytest.approx(values.mean().item(), rel=1e-12)
        for q in range(4):
            assert kvs[f"{key}_q{q}"] == pytest.approx(values.numpy()[quartile == q].mean(), rel=1e-6)
    assert set(kvs) == {f"{k}{s}" for k in losses for s in ("", "_q0", "_q1", "_q2", "_q3")}
