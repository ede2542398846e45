"""On a CUDA GPU: the loops never wait for the device, fast paths keep float32
numbers, and bf16, fp16 and --compile train and sample.

Skipped where torch sees no CUDA device (CI has none). benchmarks/gpu_suite.sh
runs this file first on a GPU machine. Every check uses a tiny UNet, so the file
takes about a minute there, most of it compiling.
"""

import contextlib
import warnings

import pytest
import torch

from guided_diffusion import logger, perf, script_util
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.nn import update_ema
from guided_diffusion.train_util import TrainLoop
from test_perf import BF16_TOLERANCE  # bfloat16's bound on a UNet's outputs, documented there
from test_perf import tiny_unet as cpu_tiny_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _strict_float32():
    """cuDNN allows TF32 convolutions by default; float32 comparisons need it off (as --tf32 False does)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def tiny_unet(**kw):
    """tests/test_perf.py's tiny UNet (16x16 inputs, attention at 8x8), with 16-channel heads, on the GPU."""
    return cpu_tiny_unet(**{"num_head_channels": 16, **kw}).to(DEVICE)


def batch(n=4, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1
    t = torch.randint(0, 20, (n,), generator=gen)
    return x.to(DEVICE), t.to(DEVICE)


def diffusion(respacing=""):
    return script_util.create_gaussian_diffusion(
        steps=20, learn_sigma=True, noise_schedule="cosine", timestep_respacing=respacing
    )


@contextlib.contextmanager
def no_host_sync():
    """Fail on any operation that makes the host wait for the GPU (a copy to the host, .item(), ...)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def relative_error(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def gradient_error(got, want):
    """Largest gradient difference relative to the largest gradient of the model (some
    parameters, like a bias before a normalisation, have gradients that are only rounding)."""
    scale = max(w.abs().max() for w in want)
    return max(((g - w).abs().max() / scale).item() for g, w in zip(got, want))


# --------------------------------------------------------------------- no host synchronisation


def test_sampling_and_nll_loops_never_wait_for_the_gpu():
    model = tiny_unet().eval()
    respaced, full = diffusion("ddim5"), diffusion()
    x, _ = batch(2)
    # The first calls build the device copies of the coefficient tables (a copy from the host, once).
    respaced.ddim_sample_loop(model, (2, 3, 16, 16))
    full.calc_bpd_loop(model, x)
    with no_host_sync():
        ddim = respaced.ddim_sample_loop(model, (2, 3, 16, 16))
        ddpm = respaced.p_sample_loop(model, (2, 3, 16, 16))
        nll = full.calc_bpd_loop(model, x, timesteps_per_call=4)
    assert ddim.shape == ddpm.shape == (2, 3, 16, 16)
    assert nll["vb"].shape == (2, 20)
    assert torch.isfinite(nll["total_bpd"]).all()


def test_plms_and_the_fork_options_never_wait_for_the_gpu_and_match_the_cpu():
    model = tiny_unet(num_classes=3).eval()
    respaced = diffusion("6")
    labels = {"y": torch.tensor([0, 2], device=DEVICE)}
    init = batch(2)[0]
    respaced.plms_sample_loop(model, (2, 3, 16, 16), model_kwargs=labels)  # tables to the GPU, once
    start = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    torch.manual_seed(0)
    with no_host_sync():
        plms = respaced.plms_sample_loop(model, (2, 3, 16, 16), noise=start, model_kwargs=labels, order=3)
        sdedit = respaced.ddim_sample_loop(
            model, (2, 3, 16, 16), noise=start, init_image=init, skip_timesteps=2,
            randomize_class=True, model_kwargs=dict(labels),
        )
    cpu_model = tiny_unet(num_classes=3).cpu().eval()
    cpu_model.load_state_dict(model.state_dict())
    want = respaced.plms_sample_loop(cpu_model, (2, 3, 16, 16), noise=start.cpu(), order=3,
                                     model_kwargs={"y": labels["y"].cpu()})
    assert relative_error(plms.cpu(), want) < 1e-4
    assert sdedit.shape == (2, 3, 16, 16) and torch.isfinite(sdedit).all()


def test_training_forward_backward_and_ema_never_wait_for_the_gpu():
    model = tiny_unet().train()
    d = diffusion()
    x, t = batch()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    d.training_losses(model, x, t)["loss"].mean().backward()  # builds the device tables
    model.zero_grad(set_to_none=True)
    with no_host_sync():
        loss = d.training_losses(model, x, t)["loss"].mean()
        loss.backward()
        update_ema(ema, params, rate=0.99)
    assert all(p.grad is not None for p in params)


def test_a_trainloop_step_waits_for_the_gpu_twice_at_most(tmp_path):
    """One transfer for everything logged of the loss (terms, timesteps, the NaN check),
    one for the gradient and parameter norms; batches and timesteps go up without waiting."""
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    x, _ = batch()
    loop = TrainLoop(
        model=tiny_unet(), diffusion=diffusion(), data=iter([]), batch_size=4, microbatch=-1, lr=1e-4,
        ema_rate="0.99", log_interval=10**6, save_interval=10**6, resume_checkpoint="",
    )
    loop.run_step(x.cpu(), {})  # builds the device tables and the optimizer state
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loop.run_step(x.cpu(), {})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) <= 2, waits


def test_coefficient_tables_are_copied_to_the_gpu_once_in_float64():
    d = diffusion()
    x, t = batch()
    d.q_sample(x, t)
    tables = d._tables_on(x.device)
    d.q_sample(x, t)
    assert d._tables_on(x.device) is tables
    assert tables["alphas_cumprod"].dtype == torch.float64
    assert tables["alphas_cumprod"].device.type == "cuda"
    torch.testing.assert_close(tables["alphas_cumprod"].cpu(), torch.from_numpy(d.alphas_cumprod), rtol=0, atol=0)


# --------------------------------------------------------------------- float32 numbers


@pytest.mark.parametrize("use_new_attention_order", [False, True])
def test_fast_paths_on_the_gpu_keep_float32_numbers(use_new_attention_order):
    """Forward and gradients with every fast path (SDPA kernels, token-major attention,
    recomputation, in-place ops) against the plain path, on the GPU."""
    model = tiny_unet(use_new_attention_order=use_new_attention_order).train()
    d = diffusion()
    x, t = batch()

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = d.training_losses(model, x, t)["loss"].mean()
        loss.backward()
        with torch.no_grad():
            out = model.eval()(x, t)
        model.train()
        return out, [p.grad.clone() for p in model.parameters()]

    out_fast, grads_fast = run()
    with perf.disabled():
        out_plain, grads_plain = run()
    assert relative_error(out_fast, out_plain) < 1e-5
    assert gradient_error(grads_fast, grads_plain) < 1e-5


def test_batched_nll_on_the_gpu_matches_one_timestep_per_call():
    model = tiny_unet().eval()
    d = diffusion()
    x, _ = batch(2)
    torch.manual_seed(7)
    one = d.calc_bpd_loop(model, x)
    torch.manual_seed(7)
    batched = d.calc_bpd_loop(model, x, timesteps_per_call=8)
    for key in ("total_bpd", "vb", "mse", "xstart_mse"):
        torch.testing.assert_close(batched[key], one[key], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- bf16, fp16, compile


def test_bf16_autocast_on_the_gpu_stays_within_its_tolerance():
    model = tiny_unet().eval()
    x, t = batch()
    with torch.no_grad():
        want = model(x, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(x, t)
    assert relative_error(got, want) < BF16_TOLERANCE


def test_fp16_training_step_on_the_gpu_updates_float32_masters():
    model = tiny_unet()
    d = diffusion()
    x, t = batch()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True)
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-3)
    before = [p.detach().clone() for p in trainer.master_params]
    trainer.zero_grad()
    trainer.backward(d.training_losses(model, x, t)["loss"].mean())
    assert trainer.optimize(opt)
    assert all(p.dtype == torch.float32 for p in trainer.master_params)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.master_params))
    # The fp16 model holds the masters rounded to half precision.
    state = trainer.master_params_to_state_dict(trainer.master_params)
    for name, p in model.named_parameters():
        if p.dtype == torch.float16:
            torch.testing.assert_close(p, state[name].to(DEVICE).half(), rtol=0, atol=0)


@pytest.fixture
def _private_inductor_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_private_inductor_cache")
def test_compile_trains_and_samples_on_the_gpu_like_eager():
    model = tiny_unet()
    compiled = torch.compile(model)
    d = diffusion()
    x, t = batch()

    def grads(net):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        d.training_losses(net, x, t)["loss"].mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    assert gradient_error(grads(compiled), grads(model)) < 1e-4

    model.eval()
    respaced = diffusion("ddim5")

    def sample(net):
        torch.manual_seed(3)
        return respaced.ddim_sample_loop(net, (2, 3, 16, 16))

    assert relative_error(sample(compiled), sample(model)) < 1e-4
