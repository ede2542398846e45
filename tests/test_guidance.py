"""Specifications of guided_diffusion.guidance: classifier guidance as a cond_fn, classifier-free
guidance as a model wrapper."""

import pytest
import torch

from guided_diffusion import guidance

torch.set_num_threads(1)


class _LinearClassifier(torch.nn.Module):
    """logits = W x.flatten() + t-dependent bias: tiny, with a known gradient."""

    def __init__(self, pixels, classes):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(classes, pixels, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.t() + t.float()[:, None] * 0.01


def test_classifier_cond_fn_is_scaled_gradient_of_log_softmax():
    classifier = _LinearClassifier(12, 4)
    x = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 5, 9])
    y = torch.tensor([0, 3, 1])
    grad = guidance.classifier_cond_fn(classifier, 2.5)(x, t, y=y)
    # d/dx log softmax(Wx)[y] = W[y] - sum_c p_c W[c]
    probs = torch.softmax(classifier(x, t), dim=-1).detach()
    w = classifier.weight.detach()
    expected = (w[y] - probs @ w).view_as(x) * 2.5
    torch.testing.assert_close(grad, expected)
    assert not x.requires_grad


def test_classifier_cond_fn_with_scale_zero_is_zero():
    grad = guidance.classifier_cond_fn(_LinearClassifier(12, 4), 0.0)(
        torch.randn(2, 3, 2, 2), torch.tensor([1, 2]), y=torch.tensor([0, 1])
    )
    assert torch.count_nonzero(grad) == 0


def test_classifier_cond_fn_without_labels_says_so():
    with pytest.raises(ValueError, match="needs labels"):
        guidance.classifier_cond_fn(_LinearClassifier(12, 4), 1.0)(torch.randn(1, 3, 2, 2), torch.tensor([0]))


# ------------------------------------------------------------------ classifier-free guidance


class _LabelModel(torch.nn.Module):
    """A class-conditional stand-in with learned-variance output: eps depends on x, t and y
    (y = -1 is the null label), the variance channels on x only. Counts its calls."""

    def __init__(self, num_classes=4, shift=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.table = torch.nn.Parameter(torch.randn(num_classes + 1, 3, generator=g) + shift)
        self.num_classes = num_classes
        self.calls, self.rows = 0, []

    def forward(self, x, t, y=None, scale=None):
        self.calls += 1
        self.rows.append(x.shape[0])
        label = self.table[(y if y is not None else torch.full_like(t, -1)).long() + 1]
        eps = torch.tanh(x) + label[:, :, None, None] * torch.cos(t.float() / 9)[:, None, None, None]
        if scale is not None:
            eps = eps * scale[:, None, None, None]
        return torch.cat([eps, 0.5 * x], dim=1)


X = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(4))
T = torch.tensor([10, 200, 500, 800, 990])
Y = torch.tensor([0, 1, 2, 3, 1])


def test_cfg_is_the_formula_on_eps_from_one_doubled_call():
    model = _LabelModel()
    out = guidance.classifier_free(model, 3.0)(X, T, y=Y)
    assert model.calls == 1 and model.rows == [10]
    cond, uncond = model(X, T, y=Y), model(X, T, y=torch.full_like(Y, -1))
    torch.testing.assert_close(out[:, :3], cond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # the variance from the conditional branch


def test_cfg_scale_zero_is_the_model_itself():
    model = _LabelModel()
    out = guidance.classifier_free(model, 0.0)(X, T, y=Y)
    assert torch.equal(out, model(X, T, y=Y)) and model.calls == 2 and model.rows == [5, 5]


def test_cfg_interval_guides_inside_it_and_skips_the_guide_outside():
    model = _LabelModel()
    out = guidance.classifier_free(model, 2.0, interval=(100, 600))(X, T, y=Y)
    assert model.calls == 1 and model.rows == [5 + 2]  # only t = 200 and 500 get the guide
    cond = model(X, T, y=Y)
    uncond = model(X, T, y=torch.full_like(Y, -1))
    inside = torch.tensor([False, True, True, False, False])
    expected = torch.where(inside[:, None, None, None], cond[:, :3] + 2.0 * (cond[:, :3] - uncond[:, :3]),
                           cond[:, :3])
    torch.testing.assert_close(out[:, :3], expected)
    model.calls = 0
    outside = guidance.classifier_free(model, 2.0, interval=(100, 600))(X[:1], T[:1], y=Y[:1])
    assert model.calls == 1 and torch.equal(outside, model(X[:1], T[:1], y=Y[:1]))


def test_cfg_interval_in_chain_steps_with_rescaled_timesteps():
    model = _LabelModel()
    # A 4000-step chain seen by the model as 0..1000: chain steps 800..2400 are model t 200..600.
    guidance.classifier_free(model, 2.0, interval=(800, 2400), timestep_scale=0.25)(X, T, y=Y)
    assert model.rows == [5 + 2]


def test_cfg_with_an_unconditional_guide_model_gives_it_no_labels():
    model, guide = _LabelModel(), _LabelModel(shift=1.0)
    guide.num_classes = None
    out = guidance.classifier_free(model, 1.5, uncond_model=guide)(X, T, y=Y)
    assert (model.calls, guide.calls) == (1, 1)
    cond, uncond = model(X, T, y=Y), guide(X, T)
    torch.testing.assert_close(out[:, :3], cond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))


def test_autoguidance_gives_the_weaker_model_the_same_labels_and_kwargs():
    model, guide = _LabelModel(), _LabelModel(shift=0.3)
    scale = torch.linspace(0.5, 1.5, 5)
    out = guidance.classifier_free(model, 2.0, uncond_model=guide, interval=(0, 600))(X, T, y=Y, scale=scale)
    cond, weak = model(X, T, y=Y, scale=scale), guide(X[:3], T[:3], y=Y[:3], scale=scale[:3])
    torch.testing.assert_close(out[:3, :3], cond[:3, :3] + 2.0 * (cond[:3, :3] - weak[:, :3]))
    torch.testing.assert_close(out[3:], cond[3:])


def test_cfg_needs_labels_when_the_model_guides_itself():
    with pytest.raises(ValueError, match="needs class labels"):
        guidance.classifier_free(_LabelModel(), 1.0)(X, T)
