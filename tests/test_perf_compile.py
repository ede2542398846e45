"""`--compile` on CPU: a training step and a sampling loop run and agree with eager mode.

Compiling costs minutes on a small CPU, so the networks are as small as the UNet
allows and the tests are marked slow. Inductor's cache goes to a private folder.
"""

import argparse
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from guided_diffusion import logger, perf, script_util
from guided_diffusion import unet as U
from guided_diffusion.train_util import TrainLoop, seed_all

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _private_inductor_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("CI", "true")  # Inductor is stricter about fallbacks under CI (GitHub Actions sets it)
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def smallest_unet():
    torch.manual_seed(0)
    model = U.UNetModel(
        image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_heads=1, use_scale_shift_norm=True,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.05))
    return model


def test_compiled_sampling_loop_matches_eager():
    model = smallest_unet().eval()
    diffusion = script_util.create_gaussian_diffusion(
        steps=20, learn_sigma=True, noise_schedule="cosine", timestep_respacing="ddim3"
    )
    compiled = perf.inference_model(model, argparse.Namespace(compile=True), "cpu")
    assert compiled is not model

    def sample(fn):
        torch.manual_seed(3)
        return diffusion.ddim_sample_loop(fn, (2, 3, 8, 8))

    torch.testing.assert_close(sample(compiled), sample(model), rtol=1e-4, atol=1e-4)


def test_compiled_training_step_gives_eager_gradients_and_plain_checkpoint_keys(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    diffusion = script_util.create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    grads = []
    for compile in (True, False):
        model = smallest_unet()
        loop = TrainLoop(
            model=model, diffusion=diffusion, data=iter([]), batch_size=2, microbatch=-1, lr=1e-3,
            ema_rate="0.9", log_interval=100, save_interval=100, resume_checkpoint="", compile=compile,
        )
        seed_all(4)  # timesteps (numpy) and noise (torch)
        loop.forward_backward(x, {})
        grads.append([p.grad.clone() for p in model.parameters()])
        assert loop.mp_trainer.optimize(loop.opt)  # the optimizer step runs on the shared parameters
        saved = loop.mp_trainer.master_params_to_state_dict(loop.mp_trainer.master_params)
        assert set(saved) == set(model.state_dict())  # no "_orig_mod." prefix in checkpoints
    scale = max(g.abs().max() for g in grads[1])
    for compiled, eager in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-5 * scale)


def _group_norm_calls(code):
    """How the generated code of a compiled model computes GroupNorm: ATen kernel calls, and
    Inductor's own fused kernels that compute a GroupNorm (a kernel named after it that
    reduces: one that only lays out an ATen call's input is named after it too)."""
    text = "".join(code)
    kernels = re.findall(r"(cpp_fused\w*) = async_compile\.cpp_pybinding\(.*?r'''(.*?)'''", text, re.S)
    fused = {name for name, body in kernels if "native_group_norm" in name and "tmp_acc" in body}
    return text.count("aten.native_group_norm.default("), len(fused)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cpu_compile_runs_group_norm_as_atens_kernel_with_the_same_numbers(channels_last):
    model = smallest_unet().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 17])
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    with torch.no_grad():
        eager = model(x, t)
        # Plain Inductor first: its cached graph must not come back for the fast path.
        with perf.disabled("aten_group_norm"):
            plain, code = run_and_get_code(perf.compile_module(model), x, t)
        aten_calls, fused = _group_norm_calls(code)
        assert aten_calls == 0 and fused > 0
        torch._dynamo.reset()
        fast, code = run_and_get_code(perf.compile_module(model), x, t)
        assert _group_norm_calls(code) == (norms, 0)
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
