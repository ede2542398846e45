"""Likelihood of data under a diffusion: the variational bound in bits per dimension.

The negative log-likelihood of x_0 is bounded by the prior term KL(q(x_T | x_0) || N(0, I)),
one KL term per step between the true posterior q(x_{t-1} | x_t, x_0) and the model's
p(x_{t-1} | x_t), and the discretised decoder term at t = 0 (Ho et al. 2020, eq. 5;
Nichol & Dhariwal 2021, section 2). Terms are in bits per dimension, per example.
These functions take the diffusion first; ``GaussianDiffusion._vb_terms_bpd``,
``_prior_bpd`` and ``calc_bpd_loop`` are the original's names for them.
"""

import math

import torch as th

from . import prediction
from .errors import usage
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .samplers import batch_timesteps, progress_bar

_LOG2 = math.log(2.0)


def vb_terms_bpd(diffusion, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
    """The variational-bound term L_{t} in bits per dimension, per example [B].

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretised
    decoder NLL -log p(x_0 | x_1) at t = 0 (Ho et al. eq. 5 and 13).
    Returns ``output`` and the model's ``pred_xstart``.
    """
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / _LOG2
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    decoder_nll = mean_flat(decoder_nll) / _LOG2
    return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}


def prior_bpd(diffusion, x_start):
    """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per example [B]."""
    t = batch_timesteps(diffusion.num_timesteps - 1, x_start.shape[0], x_start.device)
    mean, _, log_variance = diffusion.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / _LOG2

def calc_bpd_loop(diffusion, model, x_start, clip_denoised=True, model_kwargs=None, *, timesteps_per_call=1,
                  progress=False):
    """Negative log-likelihood of x_start in bits per dimension, with its per-step terms.

    Draws one noise tensor per timestep, T-1 down to 0 (the original's order).
    With ``timesteps_per_call=K`` the model is evaluated on K timesteps at once
    (the batch concatenated K times, tensor model_kwargs repeated to match): the
    same random draws and, up to float rounding, the same numbers, in fewer calls.
    The model must not draw random numbers (use eval mode) for that to hold.

    :return: dict with ``total_bpd`` and ``prior_bpd`` [B]; ``vb``, ``xstart_mse``,
        ``mse`` [B, T], column j holding timestep T-1-j.
    """
    if not isinstance(timesteps_per_call, int) or timesteps_per_call < 1:
        raise usage(ValueError(
            f"timesteps_per_call must be a positive integer; got {timesteps_per_call!r} "
            "(flag --nll_batch)."
        ))
    model_kwargs = model_kwargs or {}
    batch = x_start.shape[0]
    steps = list(range(diffusion.num_timesteps))[::-1]
    groups = [steps[i : i + timesteps_per_call] for i in range(0, len(steps), timesteps_per_call)]
    columns = {"vb": [], "xstart_mse": [], "mse": []}
    for group in progress_bar(groups, progress):
        k = len(group)
        noise = th.cat([th.randn_like(x_start) for _ in group])
        t = th.cat([batch_timesteps(s, batch, x_start.device) for s in group])
        x0 = th.cat([x_start] * k) if k > 1 else x_start
        x_t = diffusion.q_sample(x0, t, noise=noise)
        kwargs = {key: _repeat_batch(v, k, batch) for key, v in model_kwargs.items()} if k > 1 else model_kwargs
        with th.no_grad():
            out = vb_terms_bpd(diffusion, model, x0, x_t, t, clip_denoised=clip_denoised, model_kwargs=kwargs)
        eps = prediction.eps_from_x0(diffusion, x_t, t, out["pred_xstart"])
        per_step = {
            "vb": out["output"],
            "xstart_mse": mean_flat((out["pred_xstart"] - x0) ** 2),
            "mse": mean_flat((eps - noise) ** 2),
        }
        for key, value in per_step.items():
            columns[key].extend(value.view(k, batch).unbind(0))
    result = {key: th.stack(cols, dim=1) for key, cols in columns.items()}
    result["prior_bpd"] = prior_bpd(diffusion, x_start)
    result["total_bpd"] = result["vb"].sum(dim=1) + result["prior_bpd"]
    return {k: result[k] for k in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")}


def _repeat_batch(value, times, batch_size):
    """Repeat a model kwarg along the batch dimension (non-batch values pass through)."""
    if isinstance(value, th.Tensor) and value.ndim >= 1 and value.shape[0] == batch_size:
        return th.cat([value] * times, dim=0)
    return value
