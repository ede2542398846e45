"""Few-step samplers for ADM models: a float64 solver suite over one Karras-style denoiser.

Every solver integrates the diffusion's reverse process in the variance-exploding view
of the chain: with alpha_t = sqrt(abar_t) and sigma = sqrt(1 - abar_t) / alpha_t (the
``karras_sigma`` of ``schedule.ScheduleView``), y = x_t / alpha_t = x_0 + sigma * eps
(Karras et al. 2022, eq. 4 with s(t) = alpha_t). The model is reached only through a
denoiser D(y, sigma) -> x_0 (``KarrasDenoiser``), which maps sigma back to a fractional
model timestep (linear in log sigma between table entries), calls the ADM network
there, reads its eps (or x_0) channels, applies classifier guidance to the score and
optional clipping or dynamic thresholding. So the solvers are k-diffusion-style free
functions that never look inside the model, and k-diffusion's samplers can drive our
models through ``to_karras_denoiser``.

Each solver is one step function ``solver(denoise, y, step) -> y`` taking the state
from ``step.sigma`` to ``step.sigma_next`` (the last step ends at sigma = 0, where y is
the sample), driven by one loop, ``run``. The state and every coefficient are float64;
the network runs in its own dtype. Learned-variance outputs: every solver uses the eps
channels only (the variance channels are dropped); the stochastic solvers draw their
noise from the sigmas, as their papers do.

Public entry points: ``sample`` (the final x_0), ``run`` (also the number of model
calls and the timesteps), ``timesteps`` (step spacings), ``SOLVERS``,
``DEFAULT_SPACING``, ``to_karras_denoiser``.
"""

import dataclasses
import math

import numpy as np
import torch

from .errors import usage
from .respace import space_timesteps
from .samplers import model_device, progress_bar

SPACINGS = ("adm", "trailing", "time_uniform", "logsnr", "karras", "karras_trailing")
KARRAS_RHO = 7.0
EDM_SIGMA_MAX = 80.0  # Karras et al. 2022, table 1: the top noise level the solvers' defaults start from
# Where the multistep solvers' default log-SNR grids end (about 6/255 of the [-1, 1] range):
# measured on the digits demo (benchmarks/README.md), ending there rather than at t = 0 halves
# their error against a 1000-step reference at 10 model calls and still wins at 50.
FEW_STEP_SIGMA_MIN = 0.05


# ----------------------------------------------------------------------------- the denoiser


class KarrasDenoiser:
    """D(y, sigma) -> x_0 for an ADM model, in k-diffusion's convention y = x_0 + sigma * eps.

    :param diffusion: the model's ``GaussianDiffusion`` (a ``SpacedDiffusion`` is read
        through its base chain: the timesteps the model was trained on).
    :param model: callable ``model(x, t, **model_kwargs)`` on variance-preserving x_t and
        float timesteps t [B], returning eps (or x_0), plus variance channels if learned.
    :param clip_denoised: clamp x_0 to [-1, 1].
    :param denoised_fn: applied to x_0 before clipping.
    :param cond_fn: classifier guidance ``cond_fn(x_t, t, **model_kwargs)`` -> grad log p(y | x_t),
        applied to the score: eps <- eps - sqrt(1 - abar_t) * grad (Dhariwal & Nichol 2021, alg. 2).
    :param dynamic_threshold: a percentile p in (0, 1): x_0 is clamped to [-s, s] and
        divided by s, with s the p-quantile of |x_0| per sample and at least 1
        (Saharia et al. 2022, "Imagen", section 2.3), for large guidance scales.
    :param model_kwargs: default extra model arguments (per-call ones override them).

    ``calls`` counts model evaluations. ``sigmas`` holds the chain's noise levels in
    ascending order, as k-diffusion's discrete-schedule wrappers expose them.
    """

    def __init__(self, diffusion, model, *, clip_denoised=False, denoised_fn=None, cond_fn=None,
                 dynamic_threshold=None, model_kwargs=None):
        self.schedule = diffusion.model_schedule
        self.parameterisation = diffusion.parameterisation
        if not self.parameterisation.continuous:
            raise usage(ValueError(
                f"the solvers need a model that predicts eps or x_0; this diffusion's model predicts "
                f"{self.parameterisation.mean_type} (use the original's loops: --use_ddim or DDPM)."
            ))
        self.time_scale = 1000.0 / self.schedule.num_timesteps if diffusion.rescale_timesteps else 1.0
        self.model = model
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.cond_fn = cond_fn
        if dynamic_threshold is not None and not 0 < dynamic_threshold < 1:
            raise usage(ValueError(
                f"dynamic_threshold is a percentile in (0, 1), e.g. 0.995; got {dynamic_threshold!r}."
            ))
        self.dynamic_threshold = dynamic_threshold
        self.model_kwargs = dict(model_kwargs or {})
        self.calls = 0
        self.sigmas = torch.from_numpy(self.schedule.karras_sigma.copy())
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def __call__(self, x, sigma, /, **model_kwargs):
        """x_0 predicted from x = x_0 + sigma * eps (sigma a number or a tensor [B]); float64, shaped like x."""
        return self.denoise(x, sigma, None, model_kwargs)

    def denoise(self, y, sigma, t, model_kwargs):
        """``self(y, sigma, **model_kwargs)``, with the fractional timestep ``t`` of sigma when
        known (the grid's own, which saves the inverse map and its rounding)."""
        batch = y.shape[0]
        sigma = _per_example(sigma, batch, y.device)
        if t is None:
            t = self.schedule.t_at_karras_sigma(sigma)
        t = _per_example(t, batch, y.device)
        alpha = torch.rsqrt(1 + sigma**2)
        x_t = y.to(torch.float64) * _expand(alpha, y)
        x0 = self._x0(x_t, t * self.time_scale, alpha, sigma * alpha, {**self.model_kwargs, **model_kwargs})
        return self._finish(x0)

    def denoise_pure_noise(self, x_t, t, model_kwargs):
        """x_0 predicted at SNR 0 (a zero-terminal-SNR chain's last step, where y = x_t / alpha is
        infinite) from the variance-preserving x_t, which is pure noise there; ``t`` a number."""
        batch = x_t.shape[0]
        t = _per_example(t, batch, x_t.device)
        zero, one = torch.zeros_like(t), torch.ones_like(t)
        x0 = self._x0(x_t.to(torch.float64), t * self.time_scale, zero, one, {**self.model_kwargs, **model_kwargs})
        return self._finish(x0)

    def _finish(self, x0):
        """``denoised_fn``, then dynamic thresholding or clipping."""
        if self.denoised_fn is not None:
            x0 = self.denoised_fn(x0)
        if self.dynamic_threshold is not None:
            x0 = _dynamic_threshold(x0, self.dynamic_threshold)
        elif self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        return x0

    def _x0(self, x_t, model_t, alpha, sigma_vp, model_kwargs):
        dtype = model_dtype(self.model, x_t)
        x_in = x_t.to(dtype)
        output = self.model(x_in, model_t.to(dtype), **model_kwargs)
        self.calls += 1
        output = output[:, : x_t.shape[1]].to(torch.float64)
        alpha_x, sigma_x = _expand(alpha, x_t), _expand(sigma_vp, x_t)
        x0, eps = self.parameterisation.from_scales(output, x_t, alpha_x, sigma_x)
        if self.cond_fn is None:
            return x0
        gradient = self.cond_fn(x_in, model_t.to(dtype), **model_kwargs).to(torch.float64)
        eps = eps - sigma_x * gradient
        return (x_t - sigma_x * eps) / alpha_x


def to_karras_denoiser(diffusion, model, **kwargs):
    """The model as k-diffusion's (and EDM's) samplers expect it: ``D(x, sigma, **model_kwargs) -> x_0``
    with x = x_0 + sigma * eps; keyword arguments as ``KarrasDenoiser``.

    k-diffusion's samplers start from ``noise * sigma_max``; ``D.sigmas`` (ascending) and
    ``D.sigma_min`` / ``D.sigma_max`` give the chain's range.
    """
    return KarrasDenoiser(diffusion, model, **kwargs)


# ----------------------------------------------------------------------------- step spacings


def timesteps(diffusion, steps, spacing, *, sigma_max=None, sigma_min=None):
    """The ``steps`` model timesteps (float64, first to last) a solver visits, in the model's chain.

    ``sigma_max`` (optional) lowers the top: every spacing but ``adm`` is then laid out
    from the timestep t_top of that noise level instead of T-1. Data in [-1, 1] is lost
    in noise well before sigma = 80 (Karras et al. 2022, table 1), and schedules whose
    last steps go far beyond (the cosine schedule's clipped last beta reaches sigma ~ 20,000)
    otherwise spend a large first step where nothing happens; the solvers' defaults use 80
    (``run`` then carries the noise down from the chain's top, see ``_carry_from_top``).
    ``sigma_min`` (optional) raises the bottom of ``time_uniform``, ``logsnr`` and ``karras``
    to that noise level instead of t = 0; the solver's last step then jumps from there to
    the x_0 prediction, as a few-step grid gains nothing from finer noise.

    - ``adm``: the original's ``ddimN`` striding (t = 0, k, 2k, ... for the smallest
      integer stride k giving N steps), so DDIM here reproduces ``ddim_sample_loop`` on
      the respaced diffusion; where no stride gives N, the original's plain count "N";
    - ``trailing``: evenly spaced from the top, t = round((t_top + 1)(1 - i / N)) - 1, so
      the last step is at t ~ T/N rather than 0 (Lin et al. 2023, "Common Diffusion
      Noise Schedules and Sample Steps are Flawed", table 2);
    - ``time_uniform``: evenly spaced in t from t_top to 0;
    - ``logsnr``: evenly spaced in log SNR from t_top to 0 (Lu et al. 2022);
    - ``karras``: sigma_i^(1/rho) evenly spaced from the top's sigma to the table's
      sigma_min, rho = 7 (Karras et al. 2022, eq. 5);
    - ``karras_trailing``: the same rho = 7 grid, but down to the noise level of the
      trailing spacing's last step: a few-step grid spends no step on noise too fine to
      show, and its final x_0 prediction is taken there.
    """
    schedule = diffusion.model_schedule
    last = schedule.num_timesteps - 1
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= schedule.num_timesteps:
        raise usage(ValueError(
            f"steps must be an integer from 1 to {schedule.num_timesteps} (the model's chain); got {steps!r} "
            "(flag --steps)."
        ))
    if spacing not in SPACINGS:
        raise usage(ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)} (flag --spacing)."))
    if spacing == "adm":
        if sigma_max is not None or sigma_min is not None:
            raise usage(ValueError(
                "the adm spacing is the original's striding; sigma_max and sigma_min do not apply to it."
            ))
        try:
            kept = space_timesteps(schedule.num_timesteps, f"ddim{steps}")
        except ValueError:  # no integer stride gives that count: the original's plain count then
            kept = space_timesteps(schedule.num_timesteps, str(steps))
        return np.array(sorted(kept, reverse=True), dtype=np.float64)
    top = float(last)
    if sigma_max is not None and sigma_max < schedule.karras_sigma[-1]:
        top = float(schedule.t_at_karras_sigma(np.array([sigma_max]))[0])
    trailing = np.round((top + 1) * (1 - np.arange(steps) / steps)) - 1.0
    bottom = 0.0
    if sigma_min is not None:
        if spacing not in ("time_uniform", "logsnr", "karras"):
            raise usage(ValueError(
                f"the {spacing} spacing sets its own last step; sigma_min applies to time_uniform, logsnr "
                "and karras only."
            ))
        if not schedule.karras_sigma[0] <= sigma_min < schedule.karras_sigma_at(torch.tensor(top)):
            raise usage(ValueError(
                f"sigma_min must lie between the chain's lowest noise level {schedule.karras_sigma[0]:.4g} "
                f"and the grid's top; got {sigma_min!r}."
            ))
        bottom = float(schedule.t_at_karras_sigma(np.array([sigma_min]))[0])
    if spacing == "trailing":
        return np.maximum(trailing, 0.0)
    if spacing == "time_uniform":
        return np.linspace(top, bottom, steps, dtype=np.float64)
    if spacing == "logsnr":
        ends = schedule.logsnr_at(torch.tensor([top, bottom], dtype=torch.float64)).numpy()
        return _exact_ends(schedule.t_at_logsnr(np.linspace(ends[0], ends[1], steps)).numpy(), top, bottom)
    if spacing == "karras_trailing":
        bottom = max(trailing[-1], 0.0)
    high, low = schedule.karras_sigma_at(torch.tensor([top, bottom], dtype=torch.float64)).numpy()
    rho = 1 / KARRAS_RHO
    sigmas = np.linspace(high**rho, low**rho, steps, dtype=np.float64) ** KARRAS_RHO
    return _exact_ends(schedule.t_at_karras_sigma(sigmas).numpy(), top, bottom)


def _exact_ends(t, top, bottom):
    """Pin the first and last of a mapped grid to its ends (the maps are exact only up to rounding)."""
    t = t.copy()
    t[0] = top
    if len(t) > 1:
        t[-1] = bottom
    return t


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Step:
    """What a solver step sees: its index, the noise levels, the state it carries forward, options."""

    index: int                # this step's position, 0 .. count-1
    count: int                # how many steps the run has
    sigmas: torch.Tensor      # float64 [count + 1] noise levels, the last one 0
    times: torch.Tensor       # float64 [count] fractional model timesteps of sigmas[:-1]
    memory: dict              # solver-owned state carried between steps (multistep methods)
    options: dict             # solver options (eta, s_churn, order, ...)
    noise: object             # noise() -> a standard normal tensor shaped like y (float64)

    @property
    def sigma(self):
        return self.sigmas[self.index]

    @property
    def sigma_next(self):
        return self.sigmas[self.index + 1]

    @property
    def last(self):
        """Whether this step ends at sigma = 0 (the sample)."""
        return self.index == self.count - 1

    def lam(self, sigma):
        """log(alpha / sigma), half the log SNR, of a noise level (the DPM-Solver time variable)."""
        return -torch.log(sigma)

    def option(self, name, default):
        return self.options.get(name, default)

    def order(self, wanted, available):
        """The order a multistep method can take here: at most ``wanted`` and the points
        ``available``, and at most 2 on the step before the last (lower order at the end
        keeps few-step runs stable, as DPM-Solver's ``lower_order_final``)."""
        return max(1, min(wanted, available, self.count - self.index))


@dataclasses.dataclass
class Result:
    """What ``run`` returns: the sample, the model calls it took and the timesteps visited."""

    sample: torch.Tensor
    model_calls: int
    timesteps: np.ndarray


def run(diffusion, model, shape, solver, steps, *, spacing=None, noise=None, model_kwargs=None, cond_fn=None,
        clip_denoised=False, denoised_fn=None, progress=False, device=None, generator=None, **options):
    """Sample with solver ``solver`` (a name in ``SOLVERS`` or a step function) in ``steps`` steps.

    Visits ``grid(diffusion, solver, steps, spacing)`` and returns a ``Result`` whose
    ``sample`` is x_0 in the dtype of the noise. ``noise`` (else a standard normal draw
    from ``generator``) is x at the first timestep, or, where the grid starts below the
    chain's top (a ``sigma_max``; the defaults of every solver but ``ddim`` start at 80),
    x_T at the top carried down to the grid without an extra model call
    (``_carry_from_top``). ``options``: solver options (``eta``, ``s_churn``, ``s_tmin``,
    ``s_tmax``, ``s_noise``, ``order``), the denoiser's ``dynamic_threshold``, the
    grid's ``sigma_max`` and ``sigma_min``, and ``init_image``: start instead from that
    image noised with ``noise`` to the grid's first noise level (SDEdit; no carry).
    """
    step_fn = _solver(solver)
    times = grid(diffusion, step_fn, steps, spacing, options.pop("sigma_max", None), options.pop("sigma_min", None))
    init_image = options.pop("init_image", None)
    check_options(step_fn, options)
    denoiser = KarrasDenoiser(
        diffusion, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
        dynamic_threshold=options.pop("dynamic_threshold", None), model_kwargs=model_kwargs,
    )
    if device is None:
        device = model_device(model, noise)
    if noise is None:
        noise = torch.randn(*shape, generator=generator, device=device)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal the sample shape {tuple(shape)}.")
    schedule = diffusion.model_schedule
    times_t = torch.from_numpy(times).to(device)
    sigmas = torch.cat([schedule.karras_sigma_at(times_t), torch.zeros(1, dtype=torch.float64, device=device)])
    by_sigma = {float(s): t for s, t in zip(sigmas[:-1].tolist(), times_t)}

    def denoise(y, sigma):
        return denoiser.denoise(y, sigma, by_sigma.get(float(sigma)), {})

    noise = noise.to(device)
    if torch.isinf(sigmas[0]):  # the grid starts at a zero-terminal-SNR chain's SNR-0 step
        y = _step_from_zero_snr(denoiser, noise.to(torch.float64), times[0], sigmas[1])
        sigmas, times_t = sigmas[1:], times_t[1:]
    elif init_image is not None:  # x_t = x_0 + sigma eps in the Karras form
        y = init_image.to(device=device, dtype=torch.float64) + sigmas[0] * noise.to(torch.float64)
    elif times[0] < schedule.num_timesteps - 1 and spacing_of(step_fn, spacing) != "adm":
        y, denoise = _carry_from_top(denoise, noise, float(schedule.karras_sigma[-1]), sigmas[0])
    else:
        y = noise.to(torch.float64) / torch.rsqrt(1 + sigmas[0] ** 2)

    def draw():
        return torch.randn(y.shape, generator=generator, device=device, dtype=torch.float64)

    y = integrate(step_fn, denoise, y, sigmas, times_t, options, draw, progress)
    return Result(y.to(noise.dtype), denoiser.calls, times)


def _step_from_zero_snr(denoiser, x_t, t, sigma_next):
    """The first step of a grid that starts at SNR 0 (zero-terminal-SNR chains, Lin et al. 2023):
    there x_t is pure noise, so eps = x_t exactly and the step is DDIM's, y' = x_0 + sigma' eps,
    for every solver (multistep solvers start their history after it)."""
    if denoiser.cond_fn is not None:
        raise usage(ValueError(
            "classifier guidance turns the score into x_0 through alpha_t, which is 0 at this chain's "
            "SNR-0 step; start below it with --sigma_max (e.g. 80) or drop the classifier."
        ))
    with torch.no_grad():
        x0 = denoiser.denoise_pure_noise(x_t, t, {})
    return x0 + sigma_next * x_t


def integrate(step_fn, denoise, y, sigmas, times, options, draw, progress=False):
    """The loop of every solver: ``len(sigmas) - 1`` steps of ``step_fn`` from ``sigmas[0]`` down to
    ``sigmas[-1]`` (0), over any denoiser ``denoise(y, sigma) -> x_0``; ``draw()`` gives fresh noise."""
    memory = {}
    count = len(sigmas) - 1
    for i in progress_bar(range(count), progress):
        with torch.no_grad():  # guidance functions enable gradients for themselves
            y = step_fn(denoise, y, Step(i, count, sigmas, times, memory, options, draw))
    return y


def _carry_from_top(denoise, noise, sigma_top, sigma_start):
    """The state at ``sigma_start`` of the probability-flow ODE started from ``noise`` as x_T at the
    chain's top, and a ``denoise`` that serves its model call to the first step.

    Above sigma_max = 80 the denoiser barely changes (it predicts about the data mean), so
    one DDIM step y' = D + (sigma' / sigma)(y - D) carries the top's state down, with D taken
    at the lower end: the model call the first solver step makes there anyway. Without it
    the solvers would start from the noise at sigma_max itself, drop the data mean that the
    reference (the original's loops from x_T) carries, and stop converging to it at about
    1% of the image's range. D is evaluated at the state the top noise alone gives; the
    shift by D moves D itself by about D / sigma'^2, far below the solvers' error. At a
    zero-terminal-SNR top (sigma infinite, x_T pure noise) the step is its limit,
    y' = D + sigma' x_T.
    """
    if math.isinf(sigma_top):
        start = sigma_start * noise.to(torch.float64)
        x0 = denoise(start, sigma_start)
        y = x0 + start
    else:
        y_top = noise.to(torch.float64) / math.sqrt(1 / (1 + sigma_top**2))
        ratio = sigma_start / sigma_top
        x0 = denoise(ratio * y_top, sigma_start)
        y = x0 + ratio * (y_top - x0)
    pending = [x0]

    def denoise_serving_first(state, sigma):
        if pending and state is y and float(sigma) == float(sigma_start):
            return pending.pop()
        pending.clear()  # the first step asked elsewhere (e.g. Heun's churn): a fresh call
        return denoise(state, sigma)

    return y, denoise_serving_first


def spacing_of(solver, spacing=None):
    """The spacing ``run`` uses: ``spacing``, else the solver's default (``DEFAULT_SPACING``)."""
    if spacing is not None:
        return spacing
    return DEFAULT_SPACING.get(getattr(_solver(solver), "__name__", ""), "trailing")


def grid(diffusion, solver, steps, spacing=None, sigma_max=None, sigma_min=None):
    """The timesteps ``run`` visits: ``timesteps`` with the solver's default spacing when ``spacing``
    is None (from sigma_max = 80 unless it is ``adm``, and down to ``FEW_STEP_SIGMA_MIN`` when it is
    ``logsnr``); checked to be distinct."""
    if spacing is None:
        spacing = spacing_of(solver)
        if spacing != "adm" and sigma_max is None:
            sigma_max = EDM_SIGMA_MAX
        if spacing == "logsnr" and sigma_min is None:
            sigma_min = FEW_STEP_SIGMA_MIN
    times = timesteps(diffusion, steps, spacing, sigma_max=sigma_max, sigma_min=sigma_min)
    if len(times) > 1 and not np.all(np.diff(times) < 0):
        raise usage(ValueError(
            f"{steps} steps of the {spacing} spacing do not give distinct timesteps on this "
            f"{diffusion.model_schedule.num_timesteps}-step chain; use fewer steps or another spacing."
        ))
    return times


def sample(diffusion, model, shape, solver, steps, *, spacing=None, noise=None, model_kwargs=None, cond_fn=None,
           clip_denoised=False, denoised_fn=None, progress=False, device=None, generator=None, **options):
    """The sample (x_0, a tensor of ``shape``) of ``run``; arguments as ``run``."""
    return run(
        diffusion, model, shape, solver, steps, spacing=spacing, noise=noise, model_kwargs=model_kwargs,
        cond_fn=cond_fn, clip_denoised=clip_denoised, denoised_fn=denoised_fn, progress=progress,
        device=device, generator=generator, **options,
    ).sample


def _solver(solver):
    if callable(solver):
        return solver
    if solver not in SOLVERS:
        raise usage(ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)} (flag --sampler)."))
    return SOLVERS[solver]


def check_options(step_fn, options):
    known = set(getattr(step_fn, "options", ())) | {"dynamic_threshold", "sigma_max", "sigma_min"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise usage(ValueError(
            f"solver {getattr(step_fn, '__name__', step_fn)!r} takes no option(s) {', '.join(unknown)}; "
            f"its options: {', '.join(sorted(known))}."
        ))


# ----------------------------------------------------------------------------- first-order solvers


def ddim(denoise, y, step):
    """DDIM (Song et al. 2021, eq. 12): y' = x_0 + sqrt(sigma'^2 - c^2) eps + c z, one model call.

    ``eta`` (default 0) scales the fresh noise c as eq. 16 does; eta = 0 is deterministic
    and equals the probability-flow Euler step.
    """
    x0 = denoise(y, step.sigma)
    if step.last:
        return x0
    eps = (y - x0) / step.sigma
    eta = step.option("eta", 0.0)
    if eta == 0:
        return x0 + step.sigma_next * eps
    # Eq. 16's noise level, divided by alpha' for this view, simplifies to eta times the
    # ancestral step's sigma' sqrt(sigma^2 - sigma'^2) / sigma.
    sigma, sigma_next = step.sigma, step.sigma_next
    c = eta * sigma_next * torch.sqrt((sigma**2 - sigma_next**2).clamp(min=0)) / sigma
    c = torch.minimum(c, sigma_next)
    return x0 + torch.sqrt(step.sigma_next**2 - c**2) * eps + c * step.noise()


ddim.options = ("eta",)


def euler(denoise, y, step):
    """Euler's method on the probability-flow ODE dy/dsigma = (y - D(y, sigma)) / sigma
    (Karras et al. 2022, alg. 1 without the correction); one model call."""
    x0 = denoise(y, step.sigma)
    return y + (step.sigma_next - step.sigma) * (y - x0) / step.sigma


def euler_a(denoise, y, step):
    """Euler-ancestral: an Euler step down to sigma_down, then fresh noise of level sigma_up with
    sigma_down^2 + sigma_up^2 = sigma'^2 (the ancestral DDPM step, Ho et al. 2020, in this view;
    as k-diffusion's ``sample_euler_ancestral``); one model call. ``eta`` scales the noise (1)."""
    x0 = denoise(y, step.sigma)
    sigma, sigma_next = step.sigma, step.sigma_next
    eta = step.option("eta", 1.0)
    up = torch.minimum(sigma_next, eta * torch.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = torch.sqrt(sigma_next**2 - up**2)
    y = y + (down - sigma) * (y - x0) / sigma
    return y + up * step.noise() if not step.last else y


euler_a.options = ("eta",)


def heun(denoise, y, step):
    """Heun's second-order method with EDM's stochastic churn (Karras et al. 2022, alg. 2).

    Options ``s_churn`` (0), ``s_tmin`` (0), ``s_tmax`` (inf), ``s_noise`` (1): within
    [s_tmin, s_tmax] the state is first noised up to sigma_hat = sigma (1 + gamma), gamma =
    min(s_churn / steps, sqrt(2) - 1). Two model calls per step, one on the last.
    """
    sigma = step.sigma
    gamma = 0.0
    if step.option("s_tmin", 0.0) <= float(sigma) <= step.option("s_tmax", math.inf):
        gamma = min(step.option("s_churn", 0.0) / step.count, math.sqrt(2) - 1)
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        y = y + torch.sqrt(sigma_hat**2 - sigma**2) * step.option("s_noise", 1.0) * step.noise()
    slope = (y - denoise(y, sigma_hat)) / sigma_hat
    y_next = y + (step.sigma_next - sigma_hat) * slope
    if step.last:
        return y_next
    slope_next = (y_next - denoise(y_next, step.sigma_next)) / step.sigma_next
    return y + (step.sigma_next - sigma_hat) * (slope + slope_next) / 2


heun.options = ("s_churn", "s_tmin", "s_tmax", "s_noise")
heun.calls_per_step = 2


# ----------------------------------------------------------------------------- exponential integrators


def dpmpp_2m(denoise, y, step):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", alg. 2): a second-order multistep
    exponential integrator in lambda = -log sigma, from the x_0 predictions of this and the
    previous step; first order on the first step and on the last (to sigma = 0). One call."""
    x0 = denoise(y, step.sigma)
    if step.last:
        return x0
    h = step.lam(step.sigma_next) - step.lam(step.sigma)
    data = x0
    if "last" in step.memory:
        h_last, x0_last = step.memory["last"]
        r = h_last / h
        data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
    step.memory["last"] = (h, x0)
    return (step.sigma_next / step.sigma) * y - torch.expm1(-h) * data


def dpmpp_3m(denoise, y, step):
    """DPM-Solver++(3M): the exponential integrator y' = e^-h y + sum_k h^(k+1) phi_(k+1)(h) D^(k)
    (Lu et al. 2022, eq. 9 in this view) with the x_0 prediction's derivatives in lambda from
    a quadratic through the last three predictions (two on the second step, and on the
    step before the last; first order on the first and last steps). One call."""
    x0 = denoise(y, step.sigma)
    if step.last:
        return x0
    lam = step.lam(step.sigma)
    h = step.lam(step.sigma_next) - lam
    nodes = step.memory.get("nodes", []) + [(lam, x0)]
    order = step.order(3, len(nodes))
    derivatives = _taylor_from_nodes(nodes[-order:])
    step.memory["nodes"] = nodes[-2:]
    phis = _phi(h, order)
    update = torch.exp(-h) * y
    for k, derivative in enumerate(derivatives):
        update = update + h ** (k + 1) * phis[k] * derivative
    return update


def dpmpp_2m_sde(denoise, y, step):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", section 5 and appendix; the
    midpoint form of k-diffusion's ``sample_dpmpp_2m_sde``): the second-order multistep
    solver of the reverse SDE, with fresh noise each step. ``eta`` (1) scales the noise,
    ``s_noise`` (1) its level. One call."""
    x0 = denoise(y, step.sigma)
    if step.last:
        return x0
    eta = step.option("eta", 1.0)
    h = step.lam(step.sigma_next) - step.lam(step.sigma)
    damped = -torch.expm1(-h - eta * h)
    y_next = (step.sigma_next / step.sigma) * torch.exp(-eta * h) * y + damped * x0
    if "last" in step.memory:
        h_last, x0_last = step.memory["last"]
        y_next = y_next + 0.5 * damped * (h / h_last) * (x0 - x0_last)
    step.memory["last"] = (h, x0)
    if eta:
        spread = torch.sqrt(-torch.expm1(-2 * eta * h))
        y_next = y_next + step.noise() * step.sigma_next * spread * step.option("s_noise", 1.0)
    return y_next


dpmpp_2m_sde.options = ("eta", "s_noise")


def unipc(denoise, y, step):
    """UniPC with B(h) = 1 - e^-h ("bh2"; Zhao et al. 2023, "UniPC", alg. 1 and 2 for data
    prediction): a UniP predictor of order p from the last p x_0 predictions, then the UniC
    corrector using the prediction at the new point, which the next step reuses, so one
    model call per step. ``order`` 2 (default) or 3; the coefficients solve the order
    conditions exactly. Lower orders on the first steps; first order on the last."""
    order_max = step.option("order", 2)
    if order_max not in (1, 2, 3):
        raise usage(ValueError(f"UniPC order must be 1, 2 or 3; got {order_max!r}."))
    x0 = step.memory.pop("next_x0", None)  # the last corrector's model call, at this very y
    if x0 is None:
        x0 = denoise(y, step.sigma)
    if step.last:
        return x0
    lam = step.lam(step.sigma)
    h = step.lam(step.sigma_next) - lam
    nodes = step.memory.setdefault("nodes", [])  # earlier (lambda, x_0), oldest first
    order = step.order(order_max, len(nodes) + 1)
    older = nodes[len(nodes) - (order - 1):] if order > 1 else []
    base = (step.sigma_next / step.sigma) * y - torch.expm1(-h) * x0
    predicted = base + _unipc_sum(older, lam, x0, h)  # UniP
    x0_next = denoise(predicted, step.sigma_next)
    corrected = base + _unipc_sum(older + [(lam + h, x0_next)], lam, x0, h)  # UniC
    nodes.append((lam, x0))
    del nodes[:-2]
    step.memory["next_x0"] = x0_next
    return corrected


unipc.options = ("order",)


def _unipc_sum(nodes, lam, x0, h):
    """B(h) sum_k a_k D1_k over ``nodes`` (lambda_k, x0_k), with D1_k = (x0_k - x0) / r_k,
    r_k = (lambda_k - lambda) / h, and a solving the order conditions
    sum_k a_k r_k^(n-1) = n! h phi_(n+1)(h) / B(h) for n = 1 .. len(nodes)."""
    if not nodes:
        return 0.0
    ratios = torch.stack([(lam_k - lam) / h for lam_k, _ in nodes])
    diffs = [(x0_k - x0) / r for (_, x0_k), r in zip(nodes, ratios)]
    count = len(nodes)
    phis = _phi(h, count + 1)
    b_h = -torch.expm1(-h)
    rhs = torch.stack([math.factorial(n) * h * phis[n] / b_h for n in range(1, count + 1)])
    matrix = torch.stack([ratios ** (n - 1) for n in range(1, count + 1)])
    weights = torch.linalg.solve(matrix, rhs)
    return b_h * sum(w * d for w, d in zip(weights, diffs))


# ----------------------------------------------------------------------------- linear multistep


def ipndm(denoise, y, step):
    """Improved PNDM (Zhang & Chen 2023, "DEIS", section 4.3): Adams-Bashforth on the
    probability-flow ODE dy/dsigma = (y - D) / sigma over the last up to ``order`` (4)
    slopes, with the variable-step coefficients of the actual sigma grid (exact
    integrals of the interpolating polynomial); orders ramp up from 1, at most 2 on the
    step before the last, and the last step (to sigma = 0) returns x_0. One call."""
    order_max = step.option("order", 4)
    if order_max not in (1, 2, 3, 4):
        raise usage(ValueError(f"iPNDM order must be 1 to 4; got {order_max!r}."))
    x0 = denoise(y, step.sigma)
    if step.last:
        return x0
    slope = (y - x0) / step.sigma
    history = step.memory.get("slopes", []) + [(step.sigma, slope)]
    step.memory["slopes"] = history[-(order_max - 1):] if order_max > 1 else []
    nodes = history[-step.order(order_max, len(history)):]
    span = step.sigma_next - step.sigma
    offsets = torch.stack([(s - step.sigma) / span for s, _ in nodes])  # in units of this step
    weights = _adams_bashforth_weights(offsets)
    return y + span * sum(w * d for w, (_, d) in zip(weights, nodes))


ipndm.options = ("order",)


# ----------------------------------------------------------------------------- helpers


def _phi(h, count):
    """phi_1(-h) .. phi_count(-h) for h > 0: phi_1 = (1 - e^-h) / h, phi_(k+1) = (1/k! - phi_k) / h
    (so that h^(k+1) phi_(k+1) = int_0^h e^-(h-u) u^k / k! du)."""
    phis = [-torch.expm1(-h) / h]
    for k in range(1, count):
        phis.append((1 / math.factorial(k) - phis[-1]) / h)
    return phis


def _taylor_from_nodes(nodes):
    """[D, D', D''] (as many as nodes) at the newest of the (lambda, x_0) ``nodes``: the value and
    derivatives in lambda of the polynomial through them (Newton's divided differences)."""
    lam0, x0 = nodes[-1]
    if len(nodes) == 1:
        return [x0]
    lam1, x1 = nodes[-2]
    first = (x0 - x1) / (lam0 - lam1)
    if len(nodes) == 2:
        return [x0, first]
    lam2, x2 = nodes[-3]
    second = (first - (x1 - x2) / (lam1 - lam2)) / (lam0 - lam2)
    # D(u) = x0 + first * u + second * u (u + lam0 - lam1), u = lambda - lam0
    return [x0, first + second * (lam0 - lam1), 2 * second]


def _adams_bashforth_weights(offsets):
    """Weights w with int_0^1 p(u) du = sum_k w_k p(offsets_k) for polynomials p of degree < len(offsets)."""
    count = len(offsets)
    matrix = torch.stack([offsets**j for j in range(count)])
    moments = torch.tensor([1.0 / (j + 1) for j in range(count)], dtype=offsets.dtype, device=offsets.device)
    return torch.linalg.solve(matrix, moments)


def _dynamic_threshold(x0, percentile):
    level = torch.quantile(x0.abs().flatten(1), percentile, dim=1).clamp(min=1.0)
    level = _expand(level, x0)
    return x0.clamp(-level, level) / level


def _per_example(value, batch, device):
    value = torch.as_tensor(value, dtype=torch.float64, device=device)
    return value.expand(batch) if value.dim() == 0 else value.reshape(batch)


def _expand(values, like):
    return values.view(-1, *([1] * (like.dim() - 1)))


def model_dtype(model, x):
    """The dtype to feed ``model``: its first parameter's (float32 for float16 UNets, which cast
    inside), else ``x``'s."""
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None and first.is_floating_point():
            return first.dtype if first.dtype != torch.float16 else torch.float32
    return x.dtype


SOLVERS = {
    "ddim": ddim,
    "euler": euler,
    "euler_a": euler_a,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "unipc": unipc,
    "ipndm": ipndm,
}

# Model calls per step (the last step of heun takes one).
CALLS_PER_STEP = {name: getattr(fn, "calls_per_step", 1) for name, fn in SOLVERS.items()}

# The spacing each solver uses unless told otherwise (measured on the digits demo model:
# benchmarks/README.md); with it, the grid starts at EDM_SIGMA_MAX except for ddim's adm, and a
# logsnr grid ends at FEW_STEP_SIGMA_MIN.
DEFAULT_SPACING = {
    "ddim": "adm",
    "euler": "trailing",
    "euler_a": "trailing",
    "heun": "karras_trailing",
    "dpmpp_2m": "logsnr",
    "dpmpp_3m": "logsnr",
    "dpmpp_2m_sde": "trailing",
    "unipc": "logsnr",
    "ipndm": "logsnr",
}
