"""Editing and inverse problems on the package's own loops: inpainting, inversion,
SDEdit, ILVR and DPS.

Each operation is one function on a ``GaussianDiffusion`` (respaced or not) and a
model, in the style of the original's loops: images are NCHW tensors in [-1, 1],
``model_kwargs`` carries class labels, ``cond_fn`` classifier guidance, and the steps
are those of ``samplers.py`` (``ddpm_step`` through a ``Denoiser``) or, for inversion,
reconstruction and SDEdit, the solvers of ``solvers.py``. Random numbers come from
torch's global generator, starting as the loops do (the start noise unless ``noise``
is given, then one draw per step), so an edit that changes nothing samples what the
plain loop samples under the same seed.

References
----------
- Lugmayr et al. (2022), "RePaint: Inpainting using Denoising Diffusion Probabilistic
  Models", algorithm 1 and section 4.2 (resampling schedule).
- Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", section 4.3 and
  eq. 14 (the deterministic sampler as an ODE that can be run backwards: inversion).
- Wallace, Gokul & Naik (2023), "EDICT: Exact Diffusion Inversion via Coupled
  Transformations", section 3.
- Meng et al. (2022), "SDEdit: Guided Image Synthesis and Editing with Stochastic
  Differential Equations", algorithm 1.
- Choi et al. (2021), "ILVR: Conditioning Method for Denoising Diffusion Probabilistic
  Models", algorithm 1 (eq. 7).
- Chung et al. (2023), "Diffusion Posterior Sampling for General Noisy Inverse
  Problems", algorithm 1.
"""

import torch as th
import torch.nn.functional as F

from . import solvers
from .denoiser import Denoiser
from .errors import usage
from .samplers import batch_timesteps, ddpm_step, last_sample, model_device, progress_bar, run_loop

# ----------------------------------------------------------------------------- inpainting


def inpaint(diffusion, model, image, mask, *, jump_length=1, jump_n_sample=1, noise=None, model_kwargs=None,
            clip_denoised=True, denoised_fn=None, cond_fn=None, progress=False):
    """RePaint (Lugmayr et al. 2022, algorithm 1): fill the pixels where ``mask`` is 0.

    At every reverse step the unknown pixels come from the DDPM step and the known ones
    (``mask`` 1, broadcastable to ``image``) from ``q_sample(image, t-1)``, re-noised
    with the step's own noise draw: each pixel uses that draw once, in one region, so
    the draws stay independent and an all-zeros mask samples exactly as
    ``p_sample_loop`` does. The resampling schedule (``repaint_schedule``) goes back up
    ``jump_length`` steps, ``jump_n_sample - 1`` times per stretch, with the forward
    step x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z so the regions harmonise.
    """
    mask = _check_mask(mask, image)
    device = model_device(model, noise)
    image, mask = image.to(device), mask.to(device=device, dtype=image.dtype)
    denoiser = Denoiser(diffusion, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                        model_kwargs=model_kwargs)
    x = noise if noise is not None else th.randn(*image.shape, device=device)
    times = repaint_schedule(diffusion.num_timesteps, jump_length, jump_n_sample)
    for here, there in progress_bar(zip(times[:-1], times[1:]), progress, total=len(times) - 1):
        t = batch_timesteps(here, image.shape[0], device)
        with th.no_grad():
            if there > here:  # back up one step: q(x_there | x_here)
                beta = diffusion._coef("betas", batch_timesteps(there, image.shape[0], device), x)
                x = th.sqrt(1 - beta) * x + th.sqrt(beta) * th.randn_like(x)
                continue
            draw = th.randn_like(x)
            unknown = ddpm_step(denoiser, x, t, noise=draw)["sample"]
            known = image if here == 0 else diffusion.q_sample(image, t - 1, noise=draw)
            x = mask * known + (1 - mask) * unknown
    return x


def repaint_schedule(num_timesteps, jump_length, jump_n_sample):
    """The states RePaint visits, as timesteps from T-1 down to -1 (the clean image).

    Every ``jump_length`` steps above t = 0 (at t = 0, j, 2j, ... < T - j) the chain,
    once arrived, goes back up ``jump_length`` steps, ``jump_n_sample - 1`` times, so
    each stretch is denoised ``jump_n_sample`` times (Lugmayr et al. 2022, section 4.2).
    """
    for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise usage(ValueError(f"{name} must be a positive integer (1: no resampling); got {value!r}."))
    left = {t: jump_n_sample - 1 for t in range(0, num_timesteps - jump_length, jump_length)}
    t = num_timesteps - 1
    times = [t]
    while t >= 0:
        t -= 1
        times.append(t)
        if left.get(t, 0) > 0:
            left[t] -= 1
            times.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    return times


def _check_mask(mask, image):
    mask = th.as_tensor(mask)
    try:
        shape = th.broadcast_shapes(mask.shape, image.shape)
    except RuntimeError:
        shape = None
    if shape != image.shape:
        raise usage(ValueError(
            f"the mask's shape {tuple(mask.shape)} does not broadcast to the image's {tuple(image.shape)}; "
            "give one value per pixel (1 = keep), e.g. shape (1, 1, H, W)."
        ))
    return mask


# ----------------------------------------------------------------------------- inversion


def invert(diffusion, model, image, steps, *, model_kwargs=None, clip_denoised=False, cond_fn=None, spacing="adm",
           progress=False, return_trajectory=False):
    """DDIM inversion: the deterministic sampler's ODE run from ``image`` up to x_T (Song et al.
    2021, section 4.3 and eq. 14); returns x_T (and, with ``return_trajectory``, the list of
    x_t at every grid step, image first).

    On the grid of ``solvers.timesteps(diffusion, steps, spacing)`` (``adm``: the original's
    DDIM striding), in the solvers' view y = x_t / alpha_t = x_0 + sigma eps, each step is
    y_(i) = y_(i-1) + (sigma_i - sigma_(i-1)) eps(y_(i-1), sigma_(i-1)), the exact mirror of
    the DDIM step ``reconstruct`` takes back; the first starts at the clean image (sigma = 0),
    whose eps is read at the grid's lowest level. So the round trip is exact as the steps
    grow. Clipping x_0 (``clip_denoised``) breaks that mirror and is off by default.
    """
    eps, levels = _grid_eps(diffusion, model, image, steps, spacing, clip_denoised=clip_denoised, cond_fn=cond_fn,
                            model_kwargs=model_kwargs)
    y = image.to(th.float64)
    trajectory = [image]
    for i in progress_bar(range(steps), progress):
        with th.no_grad():  # y is at levels[i]; its eps is read at the grid step just below
            y = y + (levels[i + 1] - levels[i]) * eps(y, max(i - 1, 0))
        if return_trajectory:
            trajectory.append((y * th.rsqrt(1 + levels[i + 1] ** 2)).to(image.dtype))
    if return_trajectory:
        return trajectory[-1], trajectory
    return (y * th.rsqrt(1 + levels[-1] ** 2)).to(image.dtype)


def reconstruct(diffusion, model, x_T, steps, *, model_kwargs=None, clip_denoised=False, cond_fn=None,
                solver="ddim", spacing="adm", progress=False, **options):
    """Sample deterministically from ``x_T`` (as ``invert`` returns it) on the same grid: the
    DDIM steps back to the image (Song et al. 2021, eq. 12 with eta = 0), or any solver of
    ``solvers.SOLVERS`` with its ``options``."""
    return solvers.sample(diffusion, model, x_T.shape, solver, steps, spacing=spacing, noise=x_T,
                          model_kwargs=model_kwargs, clip_denoised=clip_denoised, cond_fn=cond_fn,
                          progress=progress, **options)


def edict_invert(diffusion, model, image, steps, *, mix=0.93, model_kwargs=None, cond_fn=None, spacing="adm",
                 progress=False):
    """Exact DDIM inversion by EDICT (Wallace et al. 2023, eqs. 14-15): x_T as a pair (x, y).

    Two copies of the image take the DDIM step in turn, each with the other's eps, and are
    mixed with weight ``mix`` (the paper's p); every step is an affine map whose inverse
    needs only the same model calls, so ``edict_reconstruct`` returns the image up to
    rounding at any number of steps, at two model calls per step. Works in the solvers'
    view y = x_t / alpha_t on the grid ``invert`` uses; returns the pair as x_t.
    """
    _check_mix(mix)
    eps, levels = _grid_eps(diffusion, model, image, steps, spacing, cond_fn=cond_fn, model_kwargs=model_kwargs)
    x = y = image.to(th.float64)
    for i in progress_bar(range(steps), progress):
        step = levels[i] - levels[i + 1]  # the DDIM step down from level i + 1, undone here
        with th.no_grad():
            y_mid = (y - (1 - mix) * x) / mix
            x_mid = (x - (1 - mix) * y_mid) / mix
            y = y_mid - step * eps(x_mid, i)
            x = x_mid - step * eps(y, i)
    scale = th.rsqrt(1 + levels[-1] ** 2)
    return (x * scale).to(image.dtype), (y * scale).to(image.dtype)


def edict_reconstruct(diffusion, model, latents, steps, *, mix=0.93, model_kwargs=None, cond_fn=None,
                      spacing="adm", progress=False):
    """The EDICT sampler from the pair ``edict_invert`` returns, down the same grid, to x_0 (its first copy)."""
    x, y = latents
    _check_mix(mix)
    eps, levels = _grid_eps(diffusion, model, x, steps, spacing, cond_fn=cond_fn, model_kwargs=model_kwargs)
    x, y = (v.to(th.float64) * th.sqrt(1 + levels[-1] ** 2) for v in (x, y))
    for i in progress_bar(reversed(range(steps)), progress, total=steps):
        step = levels[i] - levels[i + 1]
        with th.no_grad():
            x_mid = x + step * eps(y, i)
            y_mid = y + step * eps(x_mid, i)
            x = mix * x_mid + (1 - mix) * y_mid
            y = mix * y_mid + (1 - mix) * x
    return x.to(latents[0].dtype)


def _check_mix(mix):
    if not 0 < mix <= 1:
        raise usage(ValueError(f"mix must lie in (0, 1] (EDICT's p, 0.93 in the paper); got {mix!r}."))


def _grid_eps(diffusion, model, like, steps, spacing, **denoiser_kwargs):
    """(eps(y, i) read at grid step i, from the lowest; the noise levels 0, sigma_0, sigma_1, ...)
    of the inversions' grid ``solvers.timesteps(diffusion, steps, spacing)``, lowest first."""
    denoiser = solvers.to_karras_denoiser(diffusion, model, **denoiser_kwargs)
    times = th.from_numpy(solvers.timesteps(diffusion, steps, spacing)[::-1].copy()).to(like.device)
    sigmas = diffusion.model_schedule.karras_sigma_at(times)
    levels = th.cat([sigmas.new_zeros(1), sigmas])

    def eps(y, i):
        return (y - denoiser.denoise(y, sigmas[i], times[i], {})) / sigmas[i]

    return eps, levels


# ----------------------------------------------------------------------------- SDEdit


def sdedit(diffusion, model, image, strength, *, use_ddim=False, solver=None, steps=20, spacing=None, noise=None,
           model_kwargs=None, clip_denoised=True, cond_fn=None, progress=False, **options):
    """SDEdit (Meng et al. 2022, algorithm 1): noise ``image`` to ``strength`` of the chain and denoise it.

    ``strength`` in [0, 1]: 0 returns the image, 1 is plain sampling from ``noise`` (the
    guide is lost). With the original's loops (DDPM, or DDIM with ``use_ddim``) the last
    round(strength * T) steps of the diffusion's chain run from ``q_sample(image, t)``
    (``init_image`` / ``skip_timesteps``); with ``solver`` (a name of ``solvers.SOLVERS``)
    ``steps`` solver steps run from the noise level of timestep strength * (T - 1) of
    the model's chain (``sigma_max``; ``spacing`` defaults to the solver's own, or
    ``trailing`` for ddim, whose ``adm`` grid cannot start lower).
    """
    if not 0 <= strength <= 1:
        raise usage(ValueError(f"strength must lie in [0, 1] (0 keeps the image, 1 ignores it); got {strength!r}."))
    if solver is not None:
        return _sdedit_solver(diffusion, model, image, strength, solver, steps, spacing, noise, model_kwargs,
                              clip_denoised, cond_fn, progress, options)
    count = round(strength * diffusion.num_timesteps)
    if count == 0:
        return image.clone()
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    start = image if count < diffusion.num_timesteps else None
    return loop(model, image.shape, noise=noise, clip_denoised=clip_denoised, cond_fn=cond_fn,
                model_kwargs=model_kwargs, device=image.device, progress=progress,
                skip_timesteps=diffusion.num_timesteps - count, init_image=start)


def _sdedit_solver(diffusion, model, image, strength, solver, steps, spacing, noise, model_kwargs, clip_denoised,
                   cond_fn, progress, options):
    if strength == 0:
        return image.clone()
    if noise is None:
        noise = th.randn(*image.shape, device=image.device)
    run = dict(model_kwargs=model_kwargs, clip_denoised=clip_denoised, cond_fn=cond_fn, progress=progress, **options)
    if strength == 1:
        return solvers.sample(diffusion, model, image.shape, solver, steps, spacing=spacing, noise=noise, **run)
    schedule = diffusion.model_schedule
    top = th.tensor(strength * (schedule.num_timesteps - 1), dtype=th.float64)
    sigma_max = float(schedule.karras_sigma_at(top))
    if spacing is None and solvers.spacing_of(solver) == "adm":
        spacing = "trailing"
    return solvers.sample(diffusion, model, image.shape, solver, steps, spacing=spacing, noise=noise,
                          sigma_max=sigma_max, init_image=image, **run)


# ----------------------------------------------------------------------------- ILVR


def ilvr(diffusion, model, reference, *, down_factor=4, t_range=None, noise=None, model_kwargs=None,
         clip_denoised=True, denoised_fn=None, cond_fn=None, progress=False):
    """ILVR (Choi et al. 2021, algorithm 1): DDPM sampling whose low frequencies follow ``reference``.

    After each reverse step to x_(t-1), its low-pass phi_N is swapped for that of the
    reference noised to the same step: x <- x - phi_N(x) + phi_N(q_sample(reference, t-1))
    (the reference itself after the last step), for steps t in ``t_range`` = (low, high)
    of the diffusion's chain (inclusive; default every step). phi_N = ``low_pass``.
    """
    denoiser = Denoiser(diffusion, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                        model_kwargs=model_kwargs)
    low, high = t_range if t_range is not None else (0, diffusion.num_timesteps - 1)
    low_pass(reference, down_factor)  # checks the factor before sampling

    def step(x, t):
        out = ddpm_step(denoiser, x, t)
        here = int(t[0])
        if low <= here <= high:
            target = reference if here == 0 else diffusion.q_sample(reference, t - 1)
            out["sample"] = out["sample"] + low_pass(target, down_factor) - low_pass(out["sample"], down_factor)
        return out

    return last_sample(run_loop(diffusion, step, model, tuple(reference.shape), noise, reference.device, progress,
                          model_kwargs=model_kwargs))


def low_pass(x, factor):
    """phi_N of ILVR: the mean of each ``factor`` x ``factor`` block, spread back over the block.

    An orthogonal projection (down-sampling by area, up-sampling by repetition), so after
    an ILVR step the sample's low-pass equals the noised reference's exactly.
    """
    height, width = x.shape[-2:]
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or height % factor or width % factor:
        raise usage(ValueError(
            f"the down-sampling factor must be a positive integer dividing the image size {height}x{width}; "
            f"got {factor!r}."
        ))
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


# ----------------------------------------------------------------------------- DPS


def dps(diffusion, model, operator, measurement, shape, *, zeta=1.0, **kwargs):
    """The sample of ``dps_progressive`` (arguments as there)."""
    return last_sample(dps_progressive(diffusion, model, operator, measurement, shape, zeta=zeta, **kwargs))


def dps_progressive(diffusion, model, operator, measurement, shape, *, zeta=1.0, noise=None, model_kwargs=None,
                    clip_denoised=True, denoised_fn=None, cond_fn=None, progress=False):
    """Diffusion posterior sampling (Chung et al. 2023, algorithm 1) for y = A(x) + noise.

    Each DDPM step is followed by x_(t-1) <- x_(t-1) - zeta * grad_(x_t) ||y - A(x0_hat(x_t))||,
    the gradient taken through the model (a frozen network differentiates w.r.t. its
    input, gradient checkpointing included). The paper's step zeta_t = zeta' / ||y - A(x0_hat)||
    on the squared norm is this with zeta = 2 zeta'. ``operator`` is any differentiable
    function of NCHW images; ``measurement`` is y. Yields each step's ``sample``,
    ``pred_xstart`` and ``residual`` (||y - A(x0_hat)|| per image, before the correction).
    """
    guide = _MeasurementGuidance(diffusion, model, operator, measurement, zeta, clip_denoised=clip_denoised,
                                 denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs)

    def step(x, t):
        out = ddpm_step(guide, x, t)
        out["residual"] = guide.residual
        return out

    yield from run_loop(diffusion, step, model, tuple(shape), noise, None, progress, model_kwargs=model_kwargs)


class _MeasurementGuidance(Denoiser):
    """A denoiser whose reverse mean is pulled towards the measurement (DPS), guidance on the mean."""

    def __init__(self, diffusion, model, operator, measurement, zeta, **kwargs):
        super().__init__(diffusion, model, **kwargs)
        self.operator = operator
        self.measurement = measurement
        self.zeta = zeta
        self.under_autograd = True  # ddpm_step runs the model under autograd on a leaf x
        self.residual = None

    def guided_mean(self, out, x, t):
        mean = super().guided_mean(out, x, t)  # classifier guidance, called as the original's cond_fn
        residual = (self.measurement - self.operator(out["pred_xstart"])).flatten(1).norm(dim=1)
        gradient = th.autograd.grad(residual.sum(), x)[0]
        self.residual = residual.detach()
        return mean - self.zeta * gradient


def downsample_operator(factor):
    """A(x): the mean of each ``factor`` x ``factor`` block (super-resolution by ``factor``)."""
    return lambda x: F.avg_pool2d(x, factor)


def blur_operator(size=5, sigma=1.0):
    """A(x): a Gaussian blur (``size`` x ``size`` taps, width ``sigma`` pixels, reflected edges)."""
    offsets = th.arange(size, dtype=th.float64) - (size - 1) / 2
    taps = th.exp(-offsets**2 / (2 * sigma**2))
    kernel = th.outer(taps, taps) / taps.sum() ** 2

    def blur(x):
        weight = kernel.to(x).expand(x.shape[1], 1, size, size)
        return F.conv2d(F.pad(x, [size // 2] * 4, mode="reflect"), weight, groups=x.shape[1])

    return blur


def mask_operator(mask):
    """A(x) = mask * x: the pixels where ``mask`` is 1 (inpainting as a measurement)."""
    return lambda x: mask.to(x) * x
