"""Label -1 is the null label of UNetModel (classifier-free guidance) and adds no parameter."""

import json
from pathlib import Path

import pytest
import torch

from guided_diffusion import presets, script_util

from golden import preset_state_dicts

torch.set_num_threads(1)


def conditional_unet():
    flags = {**script_util.model_and_diffusion_defaults(), **script_util.model_extra_defaults()}
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 class_cond=True, num_classes=5, learn_sigma=True)
    model = script_util.create_model_and_diffusion(**flags)[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_null_label_rows_equal_the_model_with_their_class_embedding_zeroed():
    model = conditional_unet()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 500, 999, 10])
    y = torch.tensor([2, -1, 4, -1])
    got = model(x, t, y)
    zeroed = {}

    def zero_rows(module, inputs, output):
        zeroed["rows"] = output.clone()
        return output * (inputs[0] != 0)[:, None]  # rows asked for class 0 stand for the null rows here

    handle = model.label_emb.register_forward_hook(zero_rows)
    try:
        expected = model(x, t, torch.tensor([2, 0, 4, 0]))
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got[1], model(x, t, torch.tensor([2, 0, 4, 0]))[1])


def test_known_labels_give_exactly_the_original_embedding():
    model = conditional_unet()
    y = torch.tensor([0, 4, 1])
    assert torch.equal(model._class_embedding(y), model.label_emb(y))


@pytest.mark.parametrize("bad", [-2, 5])
def test_labels_outside_the_classes_are_refused(bad):
    model = conditional_unet()
    with pytest.raises(ValueError, match=r"class labels must lie in 0\.\.4, or be -1"):
        model(torch.zeros(1, 3, 8, 8), torch.tensor([1]), torch.tensor([bad]))


def test_the_null_label_gets_no_gradient_into_the_embedding_table():
    model = conditional_unet().train()
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([5, 6]), torch.tensor([-1, -1]))
    out.sum().backward()
    assert torch.count_nonzero(model.label_emb.weight.grad) == 0


def test_every_presets_state_dict_keys_and_shapes_are_unchanged():
    """Recorded from the networks before the null label existed (tests/golden/preset_state_dicts.py)."""
    recorded = json.loads((Path(__file__).parent / "golden" / "preset_state_dicts.json").read_text())
    assert sorted(recorded) == sorted(presets.PRESETS)
    for name in presets.PRESETS:
        assert preset_state_dicts.fingerprint(name) == recorded[name], name
