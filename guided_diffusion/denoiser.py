"""The model as every sampler sees it: one view built once per sampling loop.

A ``Denoiser`` binds a diffusion, a model and the per-loop options (clipping,
``denoised_fn``, a guidance ``cond_fn``, ``model_kwargs``) and answers the questions
the samplers ask at a state (x_t, t): the reverse-process mean and variance, the
predicted x_0 (unguided and guided through the score), and the guided noise. Samplers
never look inside the model or repeat the guidance logic.

It goes through the diffusion's public methods (``p_mean_variance``,
``condition_mean``, ``condition_score`` and their ``_with_grad`` forms), so a
``SpacedDiffusion`` maps timesteps and a subclass that overrides one of them is honoured.
"""

import torch

from . import prediction


class Denoiser:
    """A diffusion, a model and the options of one sampling loop.

    :param diffusion: a ``GaussianDiffusion`` (or ``SpacedDiffusion``).
    :param model: callable ``model(x, t, **model_kwargs)``.
    :param clip_denoised: clamp predicted x_0 to [-1, 1].
    :param denoised_fn: optional function applied to predicted x_0 before clipping.
    :param cond_fn: optional guidance function, ``cond_fn(x, t, **model_kwargs)`` returning
        grad log p(y | x_t) (or, with ``cond_fn_with_grad``, ``cond_fn(x, t, p_mean_var,
        **model_kwargs)`` reading the model's prediction with its graph back to x).
    :param model_kwargs: extra model arguments; kept by identity (``randomize_class``
        replaces its labels in place between steps).
    :param cond_fn_with_grad: run the model under autograd so ``cond_fn`` can differentiate
        through it (CLIP guidance); results come back detached.
    """

    def __init__(self, diffusion, model, *, clip_denoised=True, denoised_fn=None, cond_fn=None,
                 model_kwargs=None, cond_fn_with_grad=False):
        self.diffusion = diffusion
        self.model = model
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.cond_fn = cond_fn
        self.model_kwargs = model_kwargs
        self.cond_fn_with_grad = cond_fn_with_grad
        # A DDPM step runs the model under autograd on a leaf x: for cond_fn_with_grad, or for a
        # subclass whose guided_mean differentiates through the model itself (editing's DPS).
        self.under_autograd = cond_fn_with_grad

    def predict(self, x, t):
        """``p_mean_variance`` at (x, t): dict of ``mean``, ``variance``, ``log_variance``, ``pred_xstart``."""
        return self.diffusion.p_mean_variance(
            self.model, x, t, self.clip_denoised, self.denoised_fn, self.model_kwargs
        )

    def guided_mean(self, out, x, t):
        """The reverse mean of ``out`` shifted by classifier guidance (Dhariwal & Nichol 2021, alg. 1);
        ``out["mean"]`` itself without a ``cond_fn``."""
        if self.cond_fn is None:
            return out["mean"]
        shift = self.diffusion.condition_mean_with_grad if self.cond_fn_with_grad else self.diffusion.condition_mean
        return shift(self.cond_fn, out, x, t, model_kwargs=self.model_kwargs)

    def x0(self, x, t):
        """(x_0 predicted by the model, x_0 guided through the score (Dhariwal & Nichol, alg. 2)).

        The two are the same tensor without a ``cond_fn``. With ``cond_fn_with_grad`` the
        model runs under autograd on a fresh leaf copy of x and both come back detached.
        Draws no random numbers.
        """
        if self.cond_fn is None:
            out = self.predict(x, t)
            return out["pred_xstart"], out["pred_xstart"]
        if self.cond_fn_with_grad:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_()
                out = self.predict(leaf, t)
                guided = self.diffusion.condition_score_with_grad(
                    self.cond_fn, out, leaf, t, model_kwargs=self.model_kwargs
                )
            return out["pred_xstart"].detach(), guided["pred_xstart"].detach()
        out = self.predict(x, t)
        guided = self.diffusion.condition_score(self.cond_fn, out, x, t, model_kwargs=self.model_kwargs)
        return out["pred_xstart"], guided["pred_xstart"]

    def eps(self, x, t):
        """(guided eps, guided x_0, unguided x_0) at (x, t); eps is implied by the guided x_0."""
        x0, guided_x0 = self.x0(x, t)
        return prediction.eps_from_x0(self.diffusion, x, t, guided_x0), guided_x0, x0
