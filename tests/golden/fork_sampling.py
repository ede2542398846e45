#!/usr/bin/env python3
"""Scenarios for the sampling options of the guided-diffusion-sdk fork.

PyPI's guided-diffusion-sdk 1.0.0 (the original that bench.py and the golden
scenarios use) is OpenAI's guided_diffusion plus the sampling options of the fork
that CLIP-guided notebooks and Disco Diffusion build on: ``skip_timesteps``,
``init_image``, ``randomize_class`` and ``cond_fn_with_grad`` on the loops, the
``*_with_grad`` steps, DDIM's ``transformation_fn``, and the PLMS sampler.

``run(gd)`` replays them against the ``guided_diffusion`` package ``gd`` and
returns a dict of numpy arrays. Recorded from the original with

    PYTHONPATH=path/to/guided_diffusion_sdk-1.0.0 python tests/golden/fork_sampling.py tests/golden/fork_sampling.npz

(the original's PLMS fails for order 1, so that case is not recorded).
"""

import importlib
import sys

import numpy as np
import torch as th

SHAPE = (2, 3, 8, 8)
NUM_CLASSES = 5


class ToyModel(th.nn.Module):
    """A deterministic, differentiable, class-conditional stand-in for a UNet.

    Outputs 2*C channels (epsilon and the LEARNED_RANGE variance value in [-1, 1])
    from fixed weights, so that both implementations see the same function.
    """

    def __init__(self, channels=3):
        super().__init__()
        self.num_classes = NUM_CLASSES
        g = th.Generator().manual_seed(1234)
        self.mix = th.nn.Parameter(th.randn(2 * channels, channels, generator=g) * 0.5)
        self.labels = th.nn.Parameter(th.randn(NUM_CLASSES, 2 * channels, generator=g) * 0.2)
        self.channels = channels

    def forward(self, x, t, y=None):
        h = th.einsum("oc,bchw->bohw", self.mix, th.tanh(x))
        h = h * (1.5 + th.cos(t.float() / 150.0)).view(-1, 1, 1, 1)
        if y is not None:
            h = h + self.labels[y][:, :, None, None]
        eps, var = h[:, : self.channels], h[:, self.channels :]
        return th.cat([eps, th.tanh(var)], dim=1)


def _image(seed):
    g = th.Generator().manual_seed(seed)
    return th.rand(SHAPE, generator=g) * 2 - 1


def _target(seed):
    g = th.Generator().manual_seed(seed)
    return th.rand(SHAPE, generator=g) * 2 - 1


def _score_fn(scale=0.5):
    """Classic guidance: grad of -scale * |x - target|^2 / 2, called as cond_fn(x, t, y=None)."""
    target = _target(77)

    def cond_fn(x, t, y=None):
        return -scale * (x - target)

    return cond_fn


def _grad_fn(scale=2.0):
    """Guidance through the model: grad wrt x of -scale * |pred_xstart - target|^2."""
    target = _target(78)

    def cond_fn(x, t, p_mean_var, y=None):
        loss = -scale * ((p_mean_var["pred_xstart"] - target) ** 2).sum()
        return th.autograd.grad(loss, x)[0]

    return cond_fn


def _stack(outputs, key):
    return np.stack([o[key].detach().numpy() for o in outputs])


def _probe():
    """What the global generator gives next: shows how many numbers a call drew."""
    return th.rand(4).numpy()


def run(gd):
    """Replay every scenario against the package ``gd``; returns {name: array}."""
    script_util = importlib.import_module(gd.__name__ + ".script_util")
    diffusion = script_util.create_gaussian_diffusion(
        steps=100, learn_sigma=True, noise_schedule="cosine", timestep_respacing="20"
    )
    model = ToyModel()
    out = {}

    def labels():
        return {"y": th.tensor([1, 3])}

    th.manual_seed(1)
    out["p_init_skip/sample"] = diffusion.p_sample_loop(
        model, SHAPE, init_image=_image(11), skip_timesteps=5, model_kwargs=labels()
    ).numpy()
    out["p_init_skip/probe"] = _probe()

    th.manual_seed(2)
    kwargs = labels()
    steps = list(
        diffusion.p_sample_loop_progressive(
            model, SHAPE, skip_timesteps=12, randomize_class=True, model_kwargs=kwargs
        )
    )
    out["p_zeros_randclass/samples"] = _stack(steps, "sample")
    out["p_zeros_randclass/pred_xstart"] = _stack(steps, "pred_xstart")
    out["p_zeros_randclass/last_y"] = kwargs["y"].numpy()
    out["p_zeros_randclass/probe"] = _probe()

    th.manual_seed(3)
    out["p_grad/sample"] = diffusion.p_sample_loop(
        model, SHAPE, cond_fn=_grad_fn(), cond_fn_with_grad=True, model_kwargs=labels()
    ).numpy()
    out["p_grad/probe"] = _probe()

    th.manual_seed(4)
    steps = list(
        diffusion.ddim_sample_loop_progressive(
            model, SHAPE, eta=0.5, skip_timesteps=2, init_image=_image(12), model_kwargs=labels(),
            transformation_fn=lambda x: x * 0.8 + 0.1, transformation_percent=[0.3, 0.6],
        )
    )
    out["ddim_transform/samples"] = _stack(steps, "sample")
    out["ddim_transform/probe"] = _probe()

    th.manual_seed(5)
    out["ddim_grad/sample"] = diffusion.ddim_sample_loop(
        model, SHAPE, cond_fn=_grad_fn(), cond_fn_with_grad=True, eta=0.3, skip_timesteps=4,
        model_kwargs=labels(),
    ).numpy()
    out["ddim_grad/probe"] = _probe()

    th.manual_seed(6)
    kwargs = labels()
    out["ddim_score_randclass/sample"] = diffusion.ddim_sample_loop(
        model, SHAPE, cond_fn=_score_fn(), randomize_class=True, model_kwargs=kwargs
    ).numpy()
    out["ddim_score_randclass/last_y"] = kwargs["y"].numpy()
    out["ddim_score_randclass/probe"] = _probe()

    for order in (2, 3, 4):
        th.manual_seed(10 + order)
        steps = list(diffusion.plms_sample_loop_progressive(model, SHAPE, order=order, model_kwargs=labels()))
        out[f"plms{order}/samples"] = _stack(steps, "sample")
        out[f"plms{order}/pred_xstart"] = _stack(steps, "pred_xstart")
        out[f"plms{order}/probe"] = _probe()

    th.manual_seed(20)
    out["plms2_score_skip/sample"] = diffusion.plms_sample_loop(
        model, SHAPE, cond_fn=_score_fn(), skip_timesteps=6, init_image=_image(13), model_kwargs=labels()
    ).numpy()
    th.manual_seed(21)
    out["plms3_grad/sample"] = diffusion.plms_sample_loop(
        model, SHAPE, cond_fn=_grad_fn(), cond_fn_with_grad=True, order=3, model_kwargs=labels()
    ).numpy()

    # improved-diffusion's convention: the model sees timesteps rescaled to 0..1000.
    rescaled = script_util.create_gaussian_diffusion(
        steps=100, learn_sigma=True, noise_schedule="linear", timestep_respacing="10", rescale_timesteps=True
    )
    th.manual_seed(22)
    out["plms2_rescaled/sample"] = rescaled.plms_sample_loop(
        model, SHAPE, cond_fn=_score_fn(), model_kwargs=labels()
    ).numpy()
    th.manual_seed(23)
    out["ddim_grad_rescaled/sample"] = rescaled.ddim_sample_loop(
        model, SHAPE, cond_fn=_grad_fn(), cond_fn_with_grad=True, model_kwargs=labels()
    ).numpy()

    x, t = _image(14), th.tensor([3, 9])
    th.manual_seed(30)
    step = diffusion.p_sample_with_grad(model, x, t, cond_fn=_grad_fn(), model_kwargs=labels())
    out["p_sample_with_grad/sample"] = step["sample"].detach().numpy()
    out["p_sample_with_grad/pred_xstart"] = step["pred_xstart"].numpy()
    th.manual_seed(31)
    step = diffusion.ddim_sample_with_grad(model, x, t, cond_fn=_grad_fn(), model_kwargs=labels(), eta=0.5)
    out["ddim_sample_with_grad/sample"] = step["sample"].detach().numpy()
    out["ddim_sample_with_grad/pred_xstart"] = step["pred_xstart"].numpy()
    return out


def main(argv):
    if len(argv) != 2:
        sys.exit(f"usage: {argv[0]} OUT.npz")
    import guided_diffusion

    np.savez_compressed(argv[1], **run(guided_diffusion))
    print(f"wrote {argv[1]} from {guided_diffusion.__file__}")


if __name__ == "__main__":
    main(sys.argv)
