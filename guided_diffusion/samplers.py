"""The reverse-process samplers of ``GaussianDiffusion``: guidance, the DDPM, DDIM and
PLMS steps, and the one loop they share.

``GaussianDiffusion`` inherits the original's public methods from ``Samplers``; each
is a thin shim over a free step function (``ddpm_step``, ``ddim_step``, ``plms_step``)
that asks a ``Denoiser`` (the model, its options and guidance, built once per loop)
for predictions, and over ``run_loop``, the one loop they share. They read the
diffusion's float64 tables (``_gather64``, ``_expand``, ``_coef``) and draw random
numbers from torch's global generator in the original's order: the start noise
(``torch.randn(*shape)`` unless ``noise`` is given), then one ``randn_like(x)`` per
DDPM or DDIM step after the model call, also at t = 0.

References
----------
- Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", algorithm 2.
- Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", eq. 12 and 16.
- Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis",
  algorithms 1 and 2 (classifier guidance).
- Liu, Ren, Lin & Zhao (2022), "Pseudo Numerical Methods for Diffusion Models on
  Manifolds" (PLMS).
- Meng et al. (2022), "SDEdit" (sampling from a noised guide image: ``init_image``).
"""

import contextlib
import numbers
from functools import partial

import torch as th

from . import prediction
from .denoiser import Denoiser
from .errors import usage


class Samplers:
    """Guidance, sampler steps and sampling loops; mixed into ``GaussianDiffusion``."""

    # ------------------------------------------------------------------ guidance

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the reverse mean by variance * grad log p(y | x_t) (Dhariwal & Nichol, alg. 1)."""
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return self._shift_mean(p_mean_var, gradient)

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the predicted noise by -sqrt(1 - abar_t) grad log p(y | x_t) (Dhariwal & Nichol, alg. 2).

        Returns a copy of ``p_mean_var`` with ``pred_xstart`` and ``mean`` recomputed.
        """
        if model_kwargs is None:
            model_kwargs = {}
        eps = prediction.eps_from_x0(self, x, t, p_mean_var["pred_xstart"])
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return self._shift_score(p_mean_var, x, t, eps, gradient)

    def condition_mean_with_grad(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """``condition_mean`` for a guidance function that reads the model's output.

        ``cond_fn(x, t, p_mean_var, **model_kwargs)`` gets the step's ``p_mean_var``
        with its autograd graph back to ``x`` (CLIP guidance through ``pred_xstart``),
        and ``t`` as given: respaced indices, neither mapped nor rescaled.
        """
        if model_kwargs is None:
            model_kwargs = {}
        return self._shift_mean(p_mean_var, cond_fn(x, t, p_mean_var, **model_kwargs))

    def condition_score_with_grad(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """``condition_score`` for a guidance function called as in ``condition_mean_with_grad``."""
        if model_kwargs is None:
            model_kwargs = {}
        eps = prediction.eps_from_x0(self, x, t, p_mean_var["pred_xstart"])
        gradient = cond_fn(x, t, p_mean_var, **model_kwargs)
        return self._shift_score(p_mean_var, x, t, eps, gradient)

    @staticmethod
    def _shift_mean(p_mean_var, gradient):
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def _shift_score(self, p_mean_var, x, t, eps, gradient):
        eps = eps - self._coef("sqrt_one_minus_alphas_cumprod", t, x) * gradient
        out = dict(p_mean_var)
        out["pred_xstart"] = prediction.x0_from_eps(self, x, t, eps)
        out["mean"] = prediction.posterior_mean(self, out["pred_xstart"], x, t)
        return out

    # ------------------------------------------------------------------ sampler steps

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None):
        """One ancestral step x_t -> x_{t-1} (Ho et al., algorithm 2). Returns ``sample``, ``pred_xstart``."""
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                            cond_fn=cond_fn, model_kwargs=model_kwargs)
        return ddpm_step(denoiser, x, t)

    def p_sample_with_grad(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None
    ):
        """``p_sample`` with guidance through the model: ``cond_fn`` is called as in
        ``condition_mean_with_grad``. Same random draws; returns detached tensors."""
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                            cond_fn=cond_fn, model_kwargs=model_kwargs, cond_fn_with_grad=True)
        return ddpm_step(denoiser, x, t)

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0
    ):
        """One DDIM step x_t -> x_{t-1} (Song et al., eq. 12; eta=1 recovers DDPM's variance)."""
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                            cond_fn=cond_fn, model_kwargs=model_kwargs)
        return ddim_step(denoiser, x, t, eta)

    def ddim_sample_with_grad(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0
    ):
        """``ddim_sample`` with guidance through the model: ``cond_fn`` is called as in
        ``condition_mean_with_grad``. Same random draws; returns detached tensors."""
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                            cond_fn=cond_fn, model_kwargs=model_kwargs, cond_fn_with_grad=True)
        return ddim_step(denoiser, x, t, eta)

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0, *, cond_fn=None
    ):
        """One deterministic DDIM step x_t -> x_{t+1} (encoding). Draws no random numbers."""
        if eta != 0.0:
            raise ValueError(
                f"ddim_reverse_sample is deterministic and needs eta=0.0; got eta={eta}."
            )
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                            cond_fn=cond_fn, model_kwargs=model_kwargs)
        eps, x0, _ = denoiser.eps(x, t)
        abar_next = self._gather64("alphas_cumprod_next", t)
        sample = x0 * self._expand(th.sqrt(abar_next), x) + self._expand(th.sqrt(1 - abar_next), x) * eps
        return {"sample": sample, "pred_xstart": x0}

    def plms_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        cond_fn_with_grad=False, order=2, old_out=None,
    ):
        """One pseudo linear multistep step x_t -> x_{t-1} (PLMS; Liu et al. 2022, "Pseudo
        Numerical Methods for Diffusion Models on Manifolds", eq. 12 and 14).

        The noise estimate fed to the deterministic DDIM update is an Adams-Bashforth
        combination of this and up to ``order - 1`` earlier estimates, carried between
        steps in ``old_out["old_eps"]``. A step with no history (``old_out=None``) and
        ``order > 1`` is a pseudo improved-Euler step, which calls the model twice.
        Returns ``sample``, ``pred_xstart`` and ``old_eps``; draws no random numbers.
        """
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                            cond_fn=cond_fn, model_kwargs=model_kwargs, cond_fn_with_grad=cond_fn_with_grad)
        return plms_step(denoiser, x, t, order, old_out)

    # ------------------------------------------------------------------ sampling loops

    @staticmethod
    def _last_sample(outputs):
        return last_sample(outputs)

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, skip_timesteps=0, init_image=None,
        randomize_class=False, cond_fn_with_grad=False,
    ):
        """Generate samples with ancestral (DDPM) sampling; returns a tensor of ``shape``.

        ``skip_timesteps``, ``init_image`` and ``randomize_class`` are described in
        ``run_loop``; ``cond_fn_with_grad`` steps with ``p_sample_with_grad``.
        """
        return self._last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
                skip_timesteps=skip_timesteps, init_image=init_image, randomize_class=randomize_class,
                cond_fn_with_grad=cond_fn_with_grad,
            )
        )

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, skip_timesteps=0, init_image=None,
        randomize_class=False, cond_fn_with_grad=False,
    ):
        """Yield the ``p_sample`` output of every step, from t = T-1 down to 0."""
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                            model_kwargs=model_kwargs, cond_fn_with_grad=cond_fn_with_grad)
        yield from run_loop(
            self, partial(ddpm_step, denoiser), model, shape, noise, device, progress, model_kwargs=model_kwargs,
            skip_timesteps=skip_timesteps, init_image=init_image, randomize_class=randomize_class,
        )

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, eta=0.0, skip_timesteps=0, init_image=None,
        randomize_class=False, cond_fn_with_grad=False,
    ):
        """Generate samples with DDIM; returns a tensor of ``shape``. Options as ``p_sample_loop``."""
        return self._last_sample(
            self.ddim_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
                skip_timesteps=skip_timesteps, init_image=init_image, randomize_class=randomize_class,
                cond_fn_with_grad=cond_fn_with_grad,
            )
        )

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, eta=0.0, skip_timesteps=0, init_image=None,
        randomize_class=False, cond_fn_with_grad=False, transformation_fn=None, transformation_percent=(),
    ):
        """Yield the ``ddim_sample`` output of every step, from t = T-1 down to 0.

        ``transformation_fn(x)`` replaces x before step i for each fraction p in
        ``transformation_percent`` with i = int(len(steps) * (1 - p)), as in the
        guided-diffusion-sdk fork (where i counts steps left, so p is the fraction done).
        """
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                            model_kwargs=model_kwargs, cond_fn_with_grad=cond_fn_with_grad)
        count = self.num_timesteps - int(skip_timesteps)
        at = {int(count * (1 - p)) for p in transformation_percent} if transformation_fn else set()

        def transform(i, x):
            return transformation_fn(x) if i in at else x

        yield from run_loop(
            self, partial(ddim_step, denoiser, eta=eta), model, shape, noise, device, progress,
            model_kwargs=model_kwargs, skip_timesteps=skip_timesteps, init_image=init_image,
            randomize_class=randomize_class, transform=transform,
        )

    def plms_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, skip_timesteps=0, init_image=None,
        randomize_class=False, cond_fn_with_grad=False, order=2,
    ):
        """Generate samples with PLMS (``plms_sample``); options as ``p_sample_loop``."""
        return self._last_sample(
            self.plms_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
                skip_timesteps=skip_timesteps, init_image=init_image, randomize_class=randomize_class,
                cond_fn_with_grad=cond_fn_with_grad, order=order,
            )
        )

    def plms_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, skip_timesteps=0, init_image=None,
        randomize_class=False, cond_fn_with_grad=False, order=2,
    ):
        """Yield the ``plms_sample`` output of every step, each fed the previous one's history."""
        denoiser = Denoiser(self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                            model_kwargs=model_kwargs, cond_fn_with_grad=cond_fn_with_grad)
        previous = None

        def step(x, t):
            nonlocal previous
            previous = plms_step(denoiser, x, t, order, previous)
            return previous

        yield from run_loop(
            self, step, model, shape, noise, device, progress, model_kwargs=model_kwargs,
            skip_timesteps=skip_timesteps, init_image=init_image, randomize_class=randomize_class,
        )


# ----------------------------------------------------------------------------- steps and the loop


def last_sample(outputs):
    """The ``"sample"`` of the last of the loop's ``outputs`` (a progressive generator)."""
    final = None
    for final in outputs:
        pass
    return final["sample"]


def ddpm_step(denoiser, x, t, noise=None):
    """Ho et al., algorithm 2, with the mean guided as in Dhariwal & Nichol, algorithm 1.

    Draws the step's noise between the model call and the guidance, as the original,
    unless the caller gives it as ``noise`` (RePaint re-noises the known pixels with the
    same draw). With ``cond_fn_with_grad`` (``denoiser.under_autograd``) the step runs
    under autograd on a leaf copy of x and returns detached tensors.
    """
    with_grad = denoiser.under_autograd
    with th.enable_grad() if with_grad else contextlib.nullcontext():
        if with_grad:
            x = x.detach().requires_grad_()
        out = denoiser.predict(x, t)
        if noise is None:
            noise = th.randn_like(x)
        mean = denoiser.guided_mean(out, x, t)
    sample = mean + _nonzero_mask(t, x) * th.exp(0.5 * out["log_variance"]) * noise
    if with_grad:
        return {"sample": sample.detach(), "pred_xstart": out["pred_xstart"].detach()}
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_step(denoiser, x, t, eta):
    """Song et al., eq. 12, from the score-guided x_0 (Dhariwal & Nichol, algorithm 2)."""
    if denoiser.cond_fn_with_grad:
        x = x.detach()
    x0, guided_x0 = denoiser.x0(x, t)
    return {"sample": ddim_update(denoiser.diffusion, x, t, guided_x0, eta), "pred_xstart": x0}


def ddim_update(diffusion, x, t, pred_xstart, eta, eps=None, draw_noise=True):
    """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z (Song et al., eq. 12).

    ``eps`` defaults to the noise implied by ``pred_xstart`` (whatever the model
    predicts), and sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)
    (eq. 16). With ``draw_noise`` it draws one ``randn_like(x)``, also for eta = 0 and
    at t = 0 where the noise is masked out, as the original does.
    """
    if eps is None:
        eps = prediction.eps_from_x0(diffusion, x, t, pred_xstart)
    abar = diffusion._gather64("alphas_cumprod", t)
    abar_prev = diffusion._gather64("alphas_cumprod_prev", t)
    sigma = eta * th.sqrt((1 - abar_prev) / (1 - abar)) * th.sqrt(1 - abar / abar_prev)
    coef_eps = th.sqrt((1 - abar_prev - sigma**2).clamp(min=0))
    mean = pred_xstart * diffusion._expand(th.sqrt(abar_prev), x) + diffusion._expand(coef_eps, x) * eps
    if not draw_noise:
        return mean
    return mean + _nonzero_mask(t, x) * diffusion._expand(sigma, x) * th.randn_like(x)


def plms_step(denoiser, x, t, order, old_out):
    """Liu et al. (2022), eq. 12 and 14, from the score-guided noise; see ``Samplers.plms_sample``."""
    diffusion = denoiser.diffusion
    if isinstance(order, bool) or order not in (1, 2, 3, 4):
        raise ValueError(f"PLMS order must be an integer from 1 to 4; got {order!r}.")
    if diffusion.schedule.reaches_zero_snr and int(t.max()) == diffusion.num_timesteps - 1:
        # PLMS extrapolates eps and turns it into x_0 through 1 / sqrt(abar_t), infinite at SNR 0.
        raise usage(ValueError(
            "PLMS cannot step from SNR 0 (this chain ends there: --zero_terminal_snr); sample with "
            "DDIM (--use_ddim True), DDPM or --sampler."
        ))
    eps, pred_xstart, unguided_xstart = denoiser.eps(x, t)
    if order > 1 and old_out is None:
        history = [eps]
        halfway = ddim_update(diffusion, x, t, pred_xstart, 0.0, eps=eps, draw_noise=False)
        # At t = 0 the step returns pred_xstart whatever the half step gives; clamping
        # keeps that half step inside the chain (the fork wraps around to its end).
        eps_next, _, _ = denoiser.eps(halfway, (t - 1).clamp(min=0))
        eps_prime = (eps + eps_next) / 2
    else:
        history = [] if old_out is None else old_out["old_eps"]
        history.append(eps)
        eps_prime = _adams_bashforth(history[-order:])
    xstart_prime = prediction.x0_from_eps(diffusion, x, t, eps_prime)
    sample = ddim_update(diffusion, x, t, xstart_prime, 0.0, eps=eps_prime, draw_noise=False)
    if len(history) >= order:
        history.pop(0)
    # The last step returns the (guided) x_0 prediction itself.
    mask = _nonzero_mask(t, x)
    sample = sample * mask + pred_xstart * (1 - mask)
    return {"sample": sample, "pred_xstart": unguided_xstart, "old_eps": history}


def run_loop(
    diffusion, step, model, shape, noise, device, progress, *, model_kwargs=None, skip_timesteps=0,
    init_image=None, randomize_class=False, transform=None,
):
    """The loop every sampler shares: start from noise, apply ``step`` for t = T-1 .. 0.

    ``step(x, t)`` returns a dict with at least ``sample``; each dict is yielded.
    ``model`` is only consulted for the device and, with ``randomize_class``, its class count.
    The options below are those of the guided-diffusion-sdk fork (CLIP-guided
    notebooks, Disco Diffusion), with its order of random draws:

    - ``skip_timesteps``: start that many steps later, at t = T-1-skip_timesteps;
    - ``init_image``: start from ``q_sample(init_image, t_start, noise)`` (SDEdit's
      noised guide), where ``noise`` is the given or freshly drawn start; zeros when
      only ``skip_timesteps`` is given;
    - ``randomize_class``: before each step, redraw ``model_kwargs["y"]`` (in place)
      uniformly over the model's ``num_classes``;
    - ``transform(i, x)``: a function applied to the current x before step i.
    """
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple or list like (N, C, H, W); got {shape!r}.")
    integral = isinstance(skip_timesteps, numbers.Integral) and not isinstance(skip_timesteps, bool)
    if not integral or not 0 <= skip_timesteps < diffusion.num_timesteps:
        raise ValueError(
            f"skip_timesteps must be an integer from 0 to {diffusion.num_timesteps - 1} (this "
            f"diffusion has {diffusion.num_timesteps} steps); got {skip_timesteps!r}."
        )
    if device is None:
        device = model_device(model, noise)
    img = noise if noise is not None else th.randn(*shape, device=device)
    steps = list(range(diffusion.num_timesteps - skip_timesteps))[::-1]
    if skip_timesteps and init_image is None:
        init_image = th.zeros_like(img)
    if init_image is not None:
        img = diffusion.q_sample(init_image, batch_timesteps(steps[0], shape[0], device), noise=img)
    num_classes = _class_count(model) if randomize_class and model_kwargs and "y" in model_kwargs else None
    for i in progress_bar(steps, progress):
        t = batch_timesteps(i, shape[0], device)
        if num_classes is not None:
            labels = model_kwargs["y"]
            model_kwargs["y"] = th.randint(0, num_classes, labels.shape, device=labels.device)
        with th.no_grad():
            if transform is not None:
                img = transform(i, img)
            out = step(img, t)
        yield out
        img = out["sample"]


# ----------------------------------------------------------------------------- helpers


def batch_timesteps(step, batch_size, device):
    """Timestep tensor [B] filled with ``step`` (built on the device, no copy from host)."""
    return th.full((batch_size,), step, device=device, dtype=th.long)


def _nonzero_mask(t, x):
    """1 where t != 0 and 0 at the final step, shaped to broadcast against x."""
    return (t != 0).to(th.promote_types(x.dtype, th.float32)).view(-1, *([1] * (x.ndim - 1)))


def progress_bar(iterable, enabled, total=None):
    """``iterable`` wrapped in a tqdm progress bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total)


def _class_count(model):
    """``model.num_classes`` for ``randomize_class``, with a clear error when it has none."""
    count = getattr(model, "num_classes", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(
            "randomize_class draws labels over model.num_classes, but this model has "
            f"num_classes={count!r}; pass a class-conditional model (class_cond=True) "
            "or randomize_class=False."
        )
    return count


def model_device(model, noise=None):
    """The device to sample on when none is given: the model's, else the noise's, else CPU."""
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return noise.device if noise is not None else th.device("cpu")


# Adams-Bashforth weights for PLMS: integer weights, newest noise estimate first, and
# their divisor (Liu et al. 2022, eq. 12).
_ADAMS_BASHFORTH = {
    1: ((1,), 1),
    2: ((3, -1), 2),
    3: ((23, -16, 5), 12),
    4: ((55, -59, 37, -9), 24),
}


def _adams_bashforth(history):
    """Combine the noise estimates in ``history`` (oldest first, 1 to 4 of them)."""
    weights, divisor = _ADAMS_BASHFORTH[len(history)]
    if divisor == 1:
        return history[-1]
    return sum(w * eps for w, eps in zip(weights, reversed(history))) / divisor
