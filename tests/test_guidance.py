"""Specifications of guided_diffusion.guidance: classifier guidance as a cond_fn."""

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
