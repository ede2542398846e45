"""Specifications of guided_diffusion.unet beyond the golden fixtures (tiny models, CPU)."""

import math

import pytest
import torch

from guided_diffusion import kernels
from guided_diffusion import unet as U


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_unet(**kw):
    """A 2-level, 32-channel UNet with attention at 8x8 (for 16x16 inputs)."""
    args = dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True,
    )
    args.update(kw)
    torch.manual_seed(0)
    model = U.UNetModel(**args)
    randomise(model)
    return model


def randomise(model, seed=1):
    """Give every parameter (zero-initialised ones too) a non-trivial value so every path counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.05))
    return model


def image(shape, seed=2):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------- attention


def einsum_attention(q, k, v):
    """The ADM formula written out as the original's code has it: q and k scaled by
    ch^-1/4 each, the softmax in float32, cast back."""
    s = 1 / math.sqrt(math.sqrt(q.shape[1]))
    w = torch.einsum("bct,bcs->bts", q * s, k * s)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v)


def einsum_attention_legacy(qkv, heads):
    """Split heads, then q/k/v, then the ADM formula."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    return einsum_attention(q, k, v).reshape(b, -1, t)


def einsum_attention_new(qkv, heads):
    """Split q/k/v, then heads, then the ADM formula."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.chunk(3, dim=1)
    s = 1 / math.sqrt(math.sqrt(ch))  # the original scales before splitting the heads
    w = torch.einsum("bct,bcs->bts", (q * s).view(b * heads, ch, t), (k * s).view(b * heads, ch, t))
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v.reshape(b * heads, ch, t)).reshape(b, -1, t)


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize(
    "cls, formula",
    [(U.QKVAttentionLegacy, einsum_attention_legacy), (U.QKVAttention, einsum_attention_new)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_attention_rounds_exactly_like_the_original_formula(cls, formula, heads, dtype):
    """x0 predictions at large t magnify the model's last bit, so the golden results need
    the original's rounding, not just its values."""
    qkv = image((2, 3 * heads * 32, 13)).to(dtype) * 2
    got = cls(heads)(qkv)
    assert got.shape == (2, heads * 32, 13) and got.dtype == dtype
    assert torch.equal(got, formula(qkv, heads))


def test_head_orders_differ_on_the_same_qkv():
    qkv = image((1, 24, 5))
    assert not torch.allclose(U.QKVAttentionLegacy(2)(qkv), U.QKVAttention(2)(qkv))


def test_reference_and_sdpa_attention_helpers_agree():
    q, k, v = (image((3, 16, 9), seed=s) for s in (4, 5, 6))
    torch.testing.assert_close(kernels.attention_sdpa(q, k, v), U.attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_float16_attention_on_cpu_rounds_like_the_original_formula():
    q, k, v = (image((3, 16, 9), seed=s).half() for s in (4, 5, 6))
    assert torch.equal(U.attention(q, k, v), U.attention_reference(q, k, v))
    assert U.attention(q, k, v).dtype == torch.float16


def test_attention_block_handles_1d_and_3d_inputs():
    block = randomise(U.AttentionBlock(32, num_head_channels=16))
    for shape in [(2, 32, 7), (1, 32, 2, 3, 4)]:
        x = image(shape)
        flat = block(x.reshape(shape[0], 32, -1))
        torch.testing.assert_close(block(x), flat.reshape(shape))


def test_attention_block_is_not_checkpointed_unless_asked(monkeypatch):
    block = randomise(U.AttentionBlock(32, num_heads=2))
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    block(image((1, 32, 4, 4)).requires_grad_(True)).sum().backward()
    assert calls == []
    block.use_checkpoint = True
    block(image((1, 32, 4, 4)).requires_grad_(True)).sum().backward()
    assert calls == [1]


# --------------------------------------------------------------------- checkpointing


def _grads(model, x, t, seed=7):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x, t)
    (out * image(out.shape, seed=9)).sum().backward()
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, params


@pytest.mark.parametrize("scale_shift, updown", [(True, False), (False, True)])
def test_checkpointed_unet_with_dropout_matches_the_plain_one_in_train_mode(scale_shift, updown):
    kw = dict(dropout=0.3, use_scale_shift_norm=scale_shift, resblock_updown=updown)
    plain = tiny_unet(**kw).train()
    ckpt = tiny_unet(use_checkpoint=True, **kw).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = image((2, 3, 16, 16)), torch.tensor([3, 500])
    out_p, gx_p, gp_p = _grads(plain, x, t)
    out_c, gx_c, gp_c = _grads(ckpt, x, t)
    torch.testing.assert_close(out_c, out_p, atol=0, rtol=0)
    torch.testing.assert_close(gx_c, gx_p, atol=1e-6, rtol=1e-5)
    assert gp_p.keys() == gp_c.keys()
    for name in gp_p:
        torch.testing.assert_close(gp_c[name], gp_p[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradients_flow_through_a_frozen_checkpointed_unet_to_the_input():
    plain = tiny_unet().eval().requires_grad_(False)
    ckpt = tiny_unet(use_checkpoint=True).eval().requires_grad_(False)
    ckpt.load_state_dict(plain.state_dict())
    x, t = image((2, 3, 16, 16)), torch.tensor([10, 900])
    _, gx_p, gp_p = _grads(plain, x, t)
    _, gx_c, gp_c = _grads(ckpt, x, t)
    assert gp_c == {} and gx_c.abs().sum() > 0
    torch.testing.assert_close(gx_c, gx_p, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------- forward behaviour


def test_fp16_conversion_keeps_io_float32_and_convert_to_fp32_restores_the_model():
    model = tiny_unet(use_fp16=True).eval()
    x, t = image((2, 3, 16, 16)), torch.tensor([1, 600])
    with torch.no_grad():
        ref = model(x, t)  # not converted yet: runs in float32 despite use_fp16
        model.convert_to_fp16()
        assert model.dtype == torch.float16
        assert model.input_blocks[0][0].weight.dtype == torch.float16
        assert model.time_embed[0].weight.dtype == torch.float32
        assert model.out[-1].weight.dtype == torch.float32
        half = model(x, t)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, ref, atol=0.05, rtol=0.05)
        model.convert_to_fp32()
        assert model.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model(x, t).dtype == torch.float32


def test_float_timesteps_are_accepted_and_integers_as_floats_agree():
    model = tiny_unet().eval()
    x = image((2, 3, 16, 16))
    with torch.no_grad():
        as_int = model(x, torch.tensor([4, 900]))
        as_float = model(x, torch.tensor([4.0, 900.0]))
        frac = model(x, torch.tensor([4.5, 900.25]))
    torch.testing.assert_close(as_float, as_int, atol=0, rtol=0)
    assert not torch.allclose(frac, as_int)


def test_scalar_timestep_is_broadcast_over_the_batch():
    model = tiny_unet().eval()
    x = image((2, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.tensor([7, 7])), atol=0, rtol=0)


def test_labels_may_be_passed_positionally():
    model = tiny_unet(num_classes=5).eval()
    x, t, y = image((2, 3, 16, 16)), torch.tensor([1, 2]), torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), model(x, t, y=y), atol=0, rtol=0)
        assert not torch.allclose(model(x, t, y), model(x, t, torch.tensor([1, 3])))


def test_non_square_inputs_give_outputs_of_the_same_size():
    model = tiny_unet(out_channels=6).eval()
    with torch.no_grad():
        assert model(image((1, 3, 8, 20)), torch.tensor([5])).shape == (1, 6, 8, 20)


def test_fractional_channel_mult_gives_integer_widths():
    model = tiny_unet(model_channels=64, channel_mult=(0.5, 1), num_heads=1)
    assert model.input_blocks[0][0].out_channels == 32
    assert model.input_blocks[-1][0].out_channels == 64
    with torch.no_grad():
        assert model(image((1, 3, 8, 8)), torch.tensor([1])).shape == (1, 3, 8, 8)


def test_super_res_model_upsamples_low_res_and_passes_labels_through():
    torch.manual_seed(0)
    model = randomise(U.SuperResModel(
        16, 3, 32, 3, 1, (2,), channel_mult=(1, 2), num_classes=4, num_heads=2,
    )).eval()
    assert model.input_blocks[0][0].in_channels == 6
    x, t, y = image((2, 3, 16, 16)), torch.tensor([1, 2]), torch.tensor([0, 3])
    with torch.no_grad():
        out = model(x, t, low_res=image((2, 3, 4, 4), seed=3), y=y)
        out2 = model(x, t, low_res=image((2, 3, 8, 8), seed=3), y=y)
    assert out.shape == out2.shape == (2, 3, 16, 16)
    assert not torch.allclose(out, out2)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_unet_gives_one_logit_row_per_image_for_every_pool(pool):
    torch.manual_seed(0)
    model = randomise(U.EncoderUNetModel(
        image_size=16, in_channels=3, model_channels=32, out_channels=7, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32, pool=pool,
    )).eval()
    with torch.no_grad():
        logits = model(image((3, 3, 16, 16)), torch.tensor([0, 5, 9]))
    assert logits.shape == (3, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_encoder_fp16_conversion_keeps_float32_logits():
    torch.manual_seed(0)
    model = randomise(U.EncoderUNetModel(
        16, 3, 32, 5, 1, (2,), channel_mult=(1, 2), num_head_channels=32, pool="attention", use_fp16=True,
    )).eval()
    x, t = image((2, 3, 16, 16)), torch.tensor([3, 4])
    with torch.no_grad():
        ref = model(x, t)
        model.convert_to_fp16()
        assert model.middle_block[0].in_layers[2].weight.dtype == torch.float16
        half = model(x, t)
        model.convert_to_fp32()
        back = model(x, t)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(back, ref, atol=1e-3, rtol=1e-2)  # only the fp16 rounding of weights remains


# --------------------------------------------------------------------- errors


def test_class_conditional_model_without_labels_says_how_to_pass_them():
    model = tiny_unet(num_classes=3)
    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=3\).*y=labels"):
        model(image((2, 3, 16, 16)), torch.tensor([1, 2]))


def test_unconditional_model_with_labels_names_the_flag():
    model = tiny_unet()
    with pytest.raises(ValueError, match="unconditional.*--class_cond"):
        model(image((2, 3, 16, 16)), torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_labels_of_the_wrong_shape_are_rejected():
    model = tiny_unet(num_classes=3)
    with pytest.raises(ValueError, match=r"shape \[2\].*\(2, 1\)"):
        model(image((2, 3, 16, 16)), torch.tensor([1, 2]), torch.tensor([[0], [1]]))


def test_input_size_not_divisible_by_the_downsampling_names_channel_mult():
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"multiples of 2.*\(15, 16\).*--channel_mult"):
        model(image((1, 3, 15, 16)), torch.tensor([1]))


def test_wrong_number_of_input_channels_is_reported():
    with pytest.raises(ValueError, match=r"\[batch, 3, size, size\].*\(1, 1, 16, 16\)"):
        tiny_unet()(image((1, 1, 16, 16)), torch.tensor([1]))


def test_head_width_that_does_not_divide_the_channels_names_the_flag():
    with pytest.raises(ValueError, match="num_head_channels=24.*--num_head_channels"):
        U.AttentionBlock(64, num_head_channels=24)


def test_pooling_downsample_cannot_change_channels():
    with pytest.raises(ValueError, match="16 -> 8.*use_conv=True"):
        U.Downsample(16, False, out_channels=8)


def test_unknown_classifier_pool_lists_the_choices():
    with pytest.raises(NotImplementedError, match="'foo'.*spatial_v2"):
        U.EncoderUNetModel(16, 3, 32, 4, 1, (), channel_mult=(1,), pool="foo")


def test_attention_pool_needs_a_head_width():
    with pytest.raises(ValueError, match="num_head_channels"):
        U.EncoderUNetModel(16, 3, 32, 4, 1, (), channel_mult=(1,), pool="attention")


def test_super_res_model_without_low_res_says_so():
    model = U.SuperResModel(16, 3, 32, 3, 1, (), channel_mult=(1,))
    with pytest.raises(ValueError, match="low_res"):
        model(image((1, 3, 16, 16)), torch.tensor([1]))


# --------------------------------------------------------------------- memory formats and autocast


def test_channels_last_model_gives_the_same_numbers():
    model = tiny_unet().eval()
    x, t = image((2, 3, 16, 16)), torch.tensor([2, 800])
    with torch.no_grad():
        ref = model(x, t)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_runs_and_returns_the_input_dtype():
    model = tiny_unet().eval()
    x, t = image((2, 3, 16, 16)), torch.tensor([2, 800])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, t)
    assert got.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits; errors accumulate over the network's depth.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
