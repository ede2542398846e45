"""Mixed-precision training: float16 model, float32 master weights, dynamic loss scaling.

The master weights live in two flat float32 tensors, one for the parameters
with at most one dimension (biases, norm scales; shape ``(N,)``) and one for the
rest (shape ``(1, M)``), as in the original, so that its checkpoints, EMA files
and optimizer states keep the same layout.
"""

import torch
import torch.nn as nn

from . import fastpaths, logger

_HALF_CONVERTIBLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

INITIAL_LOG_LOSS_SCALE = 20.0
# Consecutive skipped steps after which training is declared diverged.
MAX_CONSECUTIVE_OVERFLOWS = 50


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite losses or gradients that loss scaling cannot fix."""


def convert_module_to_f16(l):  # noqa: E741 (the original's parameter name, for keyword calls)
    """Cast the weight and bias of the module ``l``, if a convolution, to float16 (others untouched)."""
    _cast_conv(l, torch.float16)


def convert_module_to_f32(l):  # noqa: E741
    """Undo `convert_module_to_f16`: cast a convolution's parameters back to float32."""
    _cast_conv(l, torch.float32)


def _cast_conv(module, dtype):
    if isinstance(module, _HALF_CONVERTIBLE):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def get_param_groups_and_shapes(named_model_params):
    """Split ``(name, param)`` pairs into the two master groups.

    Returns ``[(vector_params, -1), (matrix_params, (1, -1))]``: parameters with
    ``ndim <= 1`` flatten to a vector, the others to a single-row matrix.
    """
    named = list(named_model_params)
    vectors = [(n, p) for n, p in named if p.ndim <= 1]
    matrices = [(n, p) for n, p in named if p.ndim > 1]
    return [(vectors, -1), (matrices, (1, -1))]


def _flat_float32(tensors):
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def make_master_params(param_groups_and_shapes):
    """One float32 ``nn.Parameter`` per group holding a flat copy of its parameters."""
    master = []
    for params, shape in param_groups_and_shapes:
        flat = _flat_float32([p for _, p in params]).view(shape)
        master.append(nn.Parameter(flat, requires_grad=True))
    return master


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """Gather the model's (float16) gradients into the float32 masters' ``.grad``.

    A parameter without a gradient contributes zeros.
    """
    for master, (params, shape) in zip(master_params, param_groups_and_shapes):
        grads = [param_grad_or_zeros(p) for _, p in params]
        master.grad = _flat_float32(grads).to(master.device).view(shape)


def param_grad_or_zeros(param):
    """``param``'s gradient (detached), or zeros like ``param`` when it has none."""
    return param.grad.detach() if param.grad is not None else torch.zeros_like(param)


def unflatten_master_params(param_group, master_param):
    """Views of ``master_param`` shaped like each parameter of ``param_group``."""
    flat = master_param.detach().reshape(-1)
    pieces, offset = [], 0
    for _, p in param_group:
        n = p.numel()
        pieces.append(flat[offset : offset + n].view(p.shape))
        offset += n
    return pieces


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """Copy the float32 masters back into the model's (float16) parameters."""
    with torch.no_grad():
        for master, (params, _) in zip(master_params, param_groups_and_shapes):
            for (_, p), value in zip(params, unflatten_master_params(params, master)):
                p.copy_(value)


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """The model's state_dict with parameter values taken from ``master_params`` (float32)."""
    state_dict = model.state_dict()
    if use_fp16:
        for master, (params, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(params, unflatten_master_params(params, master)):
                if name not in state_dict:
                    raise KeyError(f"parameter {name!r} is not in the model's state_dict")
                state_dict[name] = value
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            if name not in state_dict:
                raise KeyError(f"parameter {name!r} is not in the model's state_dict")
            state_dict[name] = value
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    """Inverse of `master_params_to_state_dict`: master tensors from a state_dict."""
    if use_fp16:
        named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
        return make_master_params(get_param_groups_and_shapes(named))
    return [state_dict[name] for name, _ in model.named_parameters()]


def zero_master_grads(master_params):
    """Drop the masters' gradients."""
    for p in master_params:
        p.grad = None


def zero_grad(model_params):
    """Zero the gradients in place (kept as tensors, like ``optimizer.zero_grad(set_to_none=False)``)."""
    for p in model_params:
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()


def check_overflow(value):
    """True when ``value`` (a float) is +inf, -inf or NaN."""
    return value == float("inf") or value == -float("inf") or value != value


def _norm_each(tensors):
    return [torch.linalg.vector_norm(t) for t in tensors]


def _norms(params, grad_scale):
    """(gradient norm / grad_scale, parameter norm) over all ``params``, with one host sync.

    Each tensor's L2 norm is taken in float32 (like the original) and the squares
    are summed in float64.
    """
    values = [p.detach() for p in params]
    grads = [p.grad.detach() for p in params if p.grad is not None]
    norm = torch._foreach_norm if fastpaths.enabled("foreach") else _norm_each
    param_norms = torch.stack(norm(values)).double() if values else torch.zeros(1)
    grad_norms = torch.stack(norm(grads)).double() if grads else torch.zeros(1, dtype=torch.float64)
    both = torch.stack([grad_norms.to(param_norms.device).square().sum(), param_norms.square().sum()]).sqrt()
    grad_norm, param_norm = both.tolist()
    return grad_norm / grad_scale, param_norm


class MixedPrecisionTrainer:
    """Owns the parameters the optimizer sees, and the loss scale when training in float16.

    With ``use_fp16`` the model is converted to float16 (``model.convert_to_fp16()``),
    the optimizer works on float32 master copies (`master_params`), and the loss is
    multiplied by ``2 ** lg_loss_scale`` before ``backward``. A step whose gradients
    overflow is skipped and the scale halved; every successful step grows
    ``lg_loss_scale`` by ``fp16_scale_growth``. Unlike the original, every master
    group is unscaled (the original unscaled only the first).
    """

    def __init__(self, *, model, use_fp16=False, fp16_scale_growth=1e-3, initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
                 max_consecutive_overflows=MAX_CONSECUTIVE_OVERFLOWS):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.lg_loss_scale = initial_lg_loss_scale
        self.max_consecutive_overflows = max_consecutive_overflows
        self.consecutive_overflows = 0
        self.model_params = list(model.parameters())
        self._released = set()  # parameters whose gradients zero_grad dropped (see zero_grad)
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        if use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            model.convert_to_fp16()

    def zero_grad(self):
        """Clear the model's gradients before a step's backward passes.

        Fast path ``release_grads``: the gradient tensors are dropped rather than zeroed,
        so they are not alive during the forward pass and the first backward pass
        writes them instead of adding to zeros. `optimize` gives zeros back to any
        parameter that had a gradient before and received none in this step, so the
        optimizer sees exactly what in-place zeroing would have left (weight decay
        and moments still apply to it); the numbers are the same.
        """
        if not fastpaths.enabled("release_grads"):
            zero_grad(self.model_params)
            return
        for p in self.model_params:
            if p.grad is not None:
                p.grad = None
                self._released.add(p)

    def _restore_released_grads(self):
        for p in self._released:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._released.clear()

    def backward(self, loss):
        """Backpropagate ``loss`` (scaled by ``2 ** lg_loss_scale`` in float16 mode)."""
        if self.use_fp16:
            (loss * (2 ** self.lg_loss_scale)).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        """Take an optimizer step; returns False when it was skipped for overflow."""
        self._restore_released_grads()
        if self.use_fp16:
            return self._optimize_fp16(opt)
        return self._optimize_normal(opt)

    def _optimize_fp16(self, opt):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        scale = 2 ** self.lg_loss_scale
        grad_norm, param_norm = _norms(self.master_params, grad_scale=scale)
        if check_overflow(grad_norm):
            self._record_overflow()
            zero_master_grads(self.master_params)
            return False
        self.consecutive_overflows = 0
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        torch._foreach_mul_([p.grad for p in self.master_params], 1.0 / scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _record_overflow(self):
        self.lg_loss_scale -= 1
        self.consecutive_overflows += 1
        logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
        if self.consecutive_overflows >= self.max_consecutive_overflows or self.lg_loss_scale < 0:
            raise TrainingDivergedError(
                f"float16 gradients overflowed {self.consecutive_overflows} steps in a row "
                f"(lg_loss_scale is now {self.lg_loss_scale:.3f}): training has diverged. The last "
                "checkpoint written is intact (saves are atomic); resume from it with a lower --lr, "
                "or train in float32 with --use_fp16 False."
            )

    def _optimize_normal(self, opt):
        grad_norm, param_norm = _norms(self.master_params, grad_scale=1.0)
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def master_params_to_state_dict(self, master_params):
        return master_params_to_state_dict(self.model, self.param_groups_and_shapes, master_params, self.use_fp16)

    def state_dict_to_master_params(self, state_dict):
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)

