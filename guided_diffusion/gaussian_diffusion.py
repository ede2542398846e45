"""Gaussian diffusion: schedules, the forward process, the learned reverse process and
the training objectives.

Around it: prediction.py turns model outputs into x_0, eps, means and targets (one
object per ``ModelMeanType``); schedule.py views the tables as functions of logSNR and
continuous time; samplers.py holds the samplers (DDPM, DDIM, PLMS) and guidance, whose
``Samplers`` methods ``GaussianDiffusion`` inherits, over the denoiser view of
denoiser.py; likelihood.py computes bits per dimension.

References
----------
- Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models" (DDPM).
- Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models"
  (cosine schedule, learned variances, hybrid loss).
- Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models" (DDIM).
- Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis"
  (classifier guidance).
- Salimans & Ho (2022), "Progressive Distillation for Fast Sampling of Diffusion
  Models" (v-prediction); loss_weights.py for the MSE weightings.
- Lin, Liu, Li & Yang (2023), "Common Diffusion Noise Schedules and Sample Steps are
  Flawed" (zero terminal SNR); Hoogeboom, Heek & Salimans (2023), "simple diffusion"
  (shifted schedules).

Conventions
-----------
All schedule maths is float64 numpy (the public table attributes). Per-timestep
coefficients are gathered from float64 torch copies kept once per device, then cast
to the working dtype (float32 unless the data is float64). Random numbers are drawn
from torch's global generator in the same order as OpenAI's implementation, so a
fixed seed reproduces its samples.
"""

import enum
import math

import numpy as np
import torch as th

from . import fastpaths, likelihood, prediction
from .errors import usage
from .nn import mean_flat
from .prediction import check_same_shape
from .samplers import Samplers
from .schedule import ScheduleView


# ----------------------------------------------------------------------------- schedules


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps, *, shift=1.0):
    """Betas (float64 numpy, length ``num_diffusion_timesteps``) of a named schedule.

    - ``"linear"``: Ho et al. (2020), 1e-4 to 0.02 for 1000 steps; the range is scaled
      by 1000/T so that other step counts span the same total noise (T < 20 therefore
      gives betas above 1, which ``GaussianDiffusion`` rejects).
    - ``"cosine"``: Nichol & Dhariwal (2021), eq. 17, offset s = 0.008, betas capped at 0.999.
      With ``shift`` s != 1 its log SNR is shifted by -2 log s at every t, abar(t) =
      sigmoid(logit(cos^2(...)) - 2 log s) (Hoogeboom et al. 2023, "simple diffusion",
      section 3.1: s = resolution / base resolution keeps a larger image as noisy).
    """
    if shift != 1.0 and schedule_name != "cosine":
        raise usage(ValueError(
            f"--schedule_shift {shift} shifts the cosine schedule; use --noise_schedule cosine "
            f"(got {schedule_name!r}) or --schedule_shift 1."
        ))
    if not shift > 0:
        raise usage(ValueError(f"--schedule_shift must be positive (1: no shift); got {shift}."))
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        def cosine(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        if shift == 1.0:
            return betas_for_alpha_bar(num_diffusion_timesteps, cosine)
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: _shift_alpha_bar(cosine(t), shift))
    raise usage(NotImplementedError(
        f"unknown beta schedule {schedule_name!r}; choose 'linear' or 'cosine' "
        "(flag --noise_schedule)."
    ))


def _shift_alpha_bar(alpha_bar, shift):
    """abar with its log SNR moved by -2 log(shift): abar / (abar + shift^2 (1 - abar))."""
    return alpha_bar / (alpha_bar + shift**2 * (1.0 - alpha_bar))


def rescale_zero_terminal_snr(betas):
    """Betas whose chain ends at SNR 0 (Lin et al. 2023, algorithm 1).

    sqrt(abar_t) is shifted so its last value is 0 and scaled so its first value stays:
    sqrt(abar'_t) = (sqrt(abar_t) - sqrt(abar_T)) sqrt(abar_1) / (sqrt(abar_1) - sqrt(abar_T)).
    The last beta is then exactly 1, so abar_T = 0 exactly. Such a chain needs a model
    that predicts v or x_0: eps carries no information about x_0 at SNR 0.
    """
    root = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = np.append(alphas_cumprod[0], alphas_cumprod[1:] / alphas_cumprod[:-1])
    return 1.0 - alphas


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous cumulative-alpha function into betas.

    ``alpha_bar(t)`` gives prod(1 - beta) up to time t in [0, 1]; step i gets
    beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at ``max_beta`` to avoid
    the singularity at t = 1.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        start, end = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(end) / alpha_bar(start), max_beta))
    return np.array(betas)


# ----------------------------------------------------------------------------- enums


class ModelMeanType(enum.Enum):
    """What the network's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}, the posterior mean itself
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise that produced x_t
    VELOCITY = enum.auto()  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)


# VELOCITY is reached like any member (attribute, name, value, pickle) but, as an alias
# would be, left out of iteration and len(): code that enumerates ModelMeanType sees the
# original's three members, as before (golden parity, scenario "enums").
ModelMeanType._member_names_.remove("VELOCITY")


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained.

    The LEARNED types need a network with 2*C output channels; LEARNED_RANGE
    interpolates (in log space) between the posterior variance and beta_t.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t = 0)
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # simple MSE (plus the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, VB term scaled by T/1000 (Nichol & Dhariwal)
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times T

    def is_vb(self):
        return self == LossType.KL or self == LossType.RESCALED_KL


# ----------------------------------------------------------------------------- gathering


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Gather ``arr[timesteps]`` as float32 and expand it to ``broadcast_shape``.

    Kept with the original's semantics for downstream code: ``arr`` is a 1-D numpy
    array, ``timesteps`` an integer tensor of shape [B], ``broadcast_shape`` starts
    with B. ``GaussianDiffusion`` itself gathers from cached device copies instead.
    """
    values = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    return _broadcast(values, broadcast_shape)


def _broadcast(values, shape):
    """Reshape per-example values [B] to [B, 1, ...] and expand them to ``shape``."""
    return values.view(-1, *([1] * (len(shape) - 1))).expand(shape)


def _compute_dtype(x):
    """The dtype coefficients are cast to: float32, or float64 for float64 data."""
    return th.promote_types(x.dtype, th.float32)


# ----------------------------------------------------------------------------- diffusion


class GaussianDiffusion(Samplers):
    """A discrete-time Gaussian diffusion and the reverse process parameterised by a model.

    :param betas: 1-D sequence of per-step noise variances in (0, 1].
    :param model_mean_type: a ``ModelMeanType``, what the model's output predicts.
    :param model_var_type: a ``ModelVarType``, how the reverse variance is obtained.
    :param loss_type: a ``LossType``, the training objective.
    :param rescale_timesteps: pass timesteps to the model as floats scaled to 0..1000
        (improved-diffusion's convention), instead of integer step indices.
    :param loss_weight: optional ``loss_weights.LossWeight``, a function of log SNR that
        multiplies the MSE term of ``training_losses``; None: unweighted (the original).

    Models are called as ``model(x, t, **model_kwargs)`` and return [B, C, ...] or,
    for learned variances, [B, 2*C, ...] tensors. Timestep arguments are int64 tensors
    of shape [B] with values in 0..num_timesteps-1.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False,
                 loss_weight=None):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.loss_weight = loss_weight

        betas = np.array(betas, dtype=np.float64)
        _check_betas(betas)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        # Infinite at abar_T = 0 (zero terminal SNR); prediction.py then uses finite forms.
        with np.errstate(divide="ignore"):
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0), Ho et al. eq. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t = 0, so its log is clipped by repeating the t = 1 value.
        # A one-step chain has no t = 1; beta_0 (the forward variance) stands in for it.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # logSNR, alpha, sigma and their continuous-time maps (solvers, modern losses).
        # ``model_schedule`` is the chain whose timesteps the model sees: this one here,
        # the base chain for a SpacedDiffusion.
        self.schedule = ScheduleView(self.alphas_cumprod)
        self.model_schedule = self.schedule

        # FIXED_LARGE uses beta_t, except at t = 0 where beta~_1 gives a better decoder.
        large_variance = np.append(first, betas[1:])
        self._gatherable = {
            "betas": self.betas,
            "log_betas": np.log(self.betas),
            "alphas_cumprod": self.alphas_cumprod,
            "alphas_cumprod_prev": self.alphas_cumprod_prev,
            "alphas_cumprod_next": self.alphas_cumprod_next,
            "one_minus_alphas_cumprod": 1.0 - self.alphas_cumprod,
            "sqrt_alphas_cumprod": self.sqrt_alphas_cumprod,
            "sqrt_one_minus_alphas_cumprod": self.sqrt_one_minus_alphas_cumprod,
            "log_one_minus_alphas_cumprod": self.log_one_minus_alphas_cumprod,
            "sqrt_recip_alphas_cumprod": self.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_alphas_cumprod": self.sqrt_recipm1_alphas_cumprod,
            "posterior_variance": self.posterior_variance,
            "posterior_log_variance_clipped": self.posterior_log_variance_clipped,
            "posterior_mean_coef1": self.posterior_mean_coef1,
            "posterior_mean_coef2": self.posterior_mean_coef2,
            "xprev_coef_xprev": 1.0 / self.posterior_mean_coef1,
            "xprev_coef_xt": self.posterior_mean_coef2 / self.posterior_mean_coef1,
            "fixed_large_variance": large_variance,
            "fixed_large_log_variance": np.log(large_variance),
            "logsnr": self.schedule.logsnr,
            "alpha": self.schedule.alpha,
            "sigma": self.schedule.sigma,
        }
        self._device_tables = {}

    # ------------------------------------------------------------------ coefficients

    def _tables_on(self, device):
        """Torch copies of the gatherable tables on ``device``, built once per device."""
        tables = self._device_tables.get(device) if fastpaths.enabled("cached_tables") else None
        if tables is None:
            # MPS has no float64; there the tables hold the float32 values the
            # original's cast would produce anyway.
            dtype = th.float32 if device.type == "mps" else th.float64
            tables = {
                name: th.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype)
                for name, arr in self._gatherable.items()
            }
            self._device_tables[device] = tables
        return tables

    def _gather64(self, name, t):
        """Float64 values [B] of table ``name`` at timesteps ``t`` (on t's device)."""
        self._check_timesteps(t)
        return self._tables_on(t.device)[name][t]

    def _coef(self, name, t, x):
        """Table ``name`` at ``t``, cast to x's compute dtype and expanded to x's shape.

        Equals the original's ``_extract_into_tensor`` for float32 (and float16) data.
        """
        return self._expand(self._gather64(name, t), x)

    @staticmethod
    def _expand(values, x):
        """Per-example values [B] (float64) cast to x's compute dtype and expanded to x's shape."""
        return _broadcast(values.to(_compute_dtype(x)), x.shape)

    def _check_timesteps(self, t):
        if not isinstance(t, th.Tensor) or t.dtype.is_floating_point or t.dtype == th.bool:
            raise TypeError(
                "timesteps must be an integer tensor of step indices, e.g. "
                f"torch.tensor([...], dtype=torch.long); got {t!r:.80}."
            )
        # Checked where it costs no device synchronisation.
        if t.device.type == "cpu" and t.numel() > 0:
            low, high = int(t.min()), int(t.max())
            if low < 0 or high >= self.num_timesteps:
                raise IndexError(
                    f"timestep out of range: got values in [{low}, {high}], but this diffusion "
                    f"has {self.num_timesteps} steps (valid: 0..{self.num_timesteps - 1}). "
                    "With timestep_respacing, pass indices into the respaced chain."
                )

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. eq. 4), each shaped like x_start."""
        mean = self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._coef("one_minus_alphas_cumprod", t, x_start)
        log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4)."""
        if noise is None:
            noise = th.randn_like(x_start)
        check_same_shape(noise, x_start, "noise", "x_start")
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
        check_same_shape(x_start, x_t, "x_start", "x_t")
        mean = (
            self._coef("posterior_mean_coef1", t, x_t) * x_start
            + self._coef("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._coef("posterior_variance", t, x_t)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisations

    @property
    def parameterisation(self):
        """The ``prediction.Parameterisation`` of ``model_mean_type``: the one seam through which
        model outputs become x_0, eps, means and training targets."""
        return prediction.for_mean_type(self.model_mean_type)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 from eps (``prediction.x0_from_eps``)."""
        return prediction.x0_from_eps(self, x_t, t, eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps from x_0 (``prediction.eps_from_x0``)."""
        return prediction.eps_from_x0(self, x_t, t, pred_xstart)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """x_0 from the posterior mean x_{t-1} (``prediction.x0_from_xprev``)."""
        return prediction.x0_from_xprev(self, x_t, t, xprev)

    def _scale_timesteps(self, t):
        """The timesteps the model sees: floats in 0..1000 when rescale_timesteps, else t."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def _split_model_output(self, model_output, x):
        """Split the model output into (prediction, variance values or None), checking channels."""
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        channels = x.shape[1]
        expected = (x.shape[0], 2 * channels if learned else channels, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            hint = (
                f"{self.model_var_type.name} needs 2*C = {2 * channels} output channels "
                "(mean and variance); build the model with learn_sigma=True"
                if learned
                else f"{self.model_var_type.name} needs C = {channels} output channels; a model "
                "with 2*C channels learns its variance, so create the diffusion with learn_sigma=True"
            )
            raise usage(ValueError(
                f"model output shape {tuple(model_output.shape)} does not fit input shape "
                f"{tuple(x.shape)}: expected {expected}. {hint}."
            ))
        if learned:
            return th.split(model_output, channels, dim=1)
        return model_output, None

    def _model_variance(self, var_values, t, x):
        """Reverse-process (variance, log-variance), shaped like x."""
        kind = self.model_var_type
        if kind == ModelVarType.LEARNED:
            return th.exp(var_values), var_values
        if kind == ModelVarType.LEARNED_RANGE:
            # Nichol & Dhariwal eq. 15: v in [-1, 1] interpolates log beta~_t .. log beta_t.
            low = self._coef("posterior_log_variance_clipped", t, x)
            high = self._coef("log_betas", t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * high + (1 - frac) * low
            return th.exp(log_variance), log_variance
        if kind == ModelVarType.FIXED_LARGE:
            return self._coef("fixed_large_variance", t, x), self._coef("fixed_large_log_variance", t, x)
        if kind == ModelVarType.FIXED_SMALL:
            return self._coef("posterior_variance", t, x), self._coef("posterior_log_variance_clipped", t, x)
        raise NotImplementedError(f"unknown model_var_type {kind!r}")

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and its prediction of x_0.

        :param model: callable ``model(x, t, **model_kwargs)``.
        :param x: x_t, [B, C, ...].
        :param t: int64 timesteps [B].
        :param clip_denoised: clamp the predicted x_0 to [-1, 1].
        :param denoised_fn: optional function applied to the predicted x_0 before clipping.
        :return: dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart``, each like x.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"timesteps must have shape [B] = ({x.shape[0]},) to match x; got {tuple(t.shape)}."
            )
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        output, var_values = self._split_model_output(model_output, x)
        variance, log_variance = self._model_variance(var_values, t, x)

        parameterisation = self.parameterisation
        pred_xstart = parameterisation.to_x0(self, output, x, t)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = parameterisation.mean(self, output, pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # ------------------------------------------------------------------ objectives

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The variational-bound term L_t in bits per dimension (``likelihood.vb_terms_bpd``)."""
        return likelihood.vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised, model_kwargs)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example training losses at timesteps t.

        :return: dict of [B] tensors: ``loss`` always; ``mse`` for the MSE types; ``vb``
            when the variance is learned (hybrid objective of Nichol & Dhariwal: the VB
            term sees a stop-gradient mean so it trains only the variance).
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)[
                "output"
            ]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):
            raise NotImplementedError(f"unknown loss_type {self.loss_type!r}")
        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        output, var_values = self._split_model_output(model_output, x_t)
        if var_values is not None:
            frozen = th.cat([output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, **kwargs: frozen, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # The MSE term is a mean over dimensions; rescale the VB sum to match (T/1000).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = self.parameterisation.target(self, x_start, x_t, t, noise)
        terms["mse"] = mean_flat((target - output) ** 2)
        # The weight multiplies the MSE term only; unweighted, the original's sum exactly.
        mse = terms["mse"] if self.loss_weight is None else self._loss_weight_at(t, output) * terms["mse"]
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms

    def _loss_weight_at(self, t, like):
        """The loss weight [B] at timesteps t (ones without one), in like's compute dtype."""
        if self.loss_weight is None:
            return th.ones(t.shape, dtype=_compute_dtype(like), device=t.device)
        weight = self.loss_weight.weight(self._gather64("logsnr", t), self.parameterisation)
        return weight.to(_compute_dtype(like))

    # ------------------------------------------------------------------ custom training loops

    def diffuse(self, x_start, t=None, noise=None, model_kwargs=None):
        """Everything one training step needs, in one call (GDF's ``diffuse``): noise x_0 and say
        what the model should predict there and how much the error counts.

        :param x_start: x_0 [B, C, ...].
        :param t: int64 timesteps [B]; None: drawn uniformly (torch's global generator).
        :param noise: eps like x_start; None: ``randn_like(x_start)``.
        :param model_kwargs: extra model arguments, returned for the model call.
        :return: dict of ``x_t`` (q_sample), ``t``, ``noise``, ``target`` (the parameterisation's
            regression target), ``logsnr`` (float64 [B]), ``weight`` ([B], the loss weight,
            ones without one), ``model_t`` (the timesteps as the network sees them: mapped
            and rescaled as ``training_losses`` passes them) and ``model_kwargs``.
        """
        if t is None:
            t = th.randint(0, self.num_timesteps, (x_start.shape[0],), device=x_start.device)
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        return {
            "x_t": x_t,
            "t": t,
            "noise": noise,
            "target": self.parameterisation.target(self, x_start, x_t, t, noise),
            "logsnr": self._gather64("logsnr", t),
            "weight": self._loss_weight_at(t, x_start),
            "model_t": self._model_timesteps(t),
            "model_kwargs": {} if model_kwargs is None else model_kwargs,
        }

    def undiffuse(self, model_output, x_t, t):
        """What a model output at (x_t, t) implies, through the parameterisation (GDF's ``undiffuse``).

        :param model_output: the network's output [B, C, ...] (or [B, 2C, ...] with learned
            variances; the variance channels are ignored).
        :return: dict of ``pred_xstart`` and ``eps``, each like x_t (x_0 unclipped).
        """
        output = model_output[:, : x_t.shape[1]]
        pred_xstart, eps = self.parameterisation.to_x0_eps(self, output, x_t, t)
        return {"pred_xstart": pred_xstart, "eps": eps}

    def _model_timesteps(self, t):
        """The timesteps the network is called with at steps t (``_scale_timesteps``)."""
        return self._scale_timesteps(t)

    # ------------------------------------------------------------------ likelihood

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension (``likelihood.prior_bpd``)."""
        return likelihood.prior_bpd(self, x_start)

    def calc_bpd_loop(
        self, model, x_start, clip_denoised=True, model_kwargs=None, *, timesteps_per_call=1, progress=False
    ):
        """Negative log-likelihood of x_start in bits per dimension, with its per-step terms.

        See ``likelihood.calc_bpd_loop``: the original's order of random draws, and
        ``timesteps_per_call=K`` evaluates K timesteps per model call (same numbers up
        to float rounding).

        :return: dict with ``total_bpd`` and ``prior_bpd`` [B]; ``vb``, ``xstart_mse``,
            ``mse`` [B, T], column j holding timestep T-1-j.
        """
        return likelihood.calc_bpd_loop(
            self, model, x_start, clip_denoised, model_kwargs, timesteps_per_call=timesteps_per_call,
            progress=progress,
        )


# ----------------------------------------------------------------------------- validation


def _check_betas(betas):
    if betas.ndim != 1 or betas.shape[0] == 0:
        raise ValueError(
            f"betas must be a non-empty 1-D array (one variance per step); got shape {betas.shape}."
        )
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise usage(ValueError(
            f"betas must lie in (0, 1]; got min {betas.min()!r}, max {betas.max()!r}. The 'linear' "
            "schedule scales 1e-4..0.02 by 1000/T, so it needs T >= 20 steps (flag "
            "--diffusion_steps); use --noise_schedule cosine for fewer steps."
        ))

