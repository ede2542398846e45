"""Fast paths give the plain path's numbers; the performance flags parse and reach the model."""

import argparse
import sys

import pytest
import torch

from guided_diffusion import fastblocks, fastpaths, kernels, perf, script_util
from guided_diffusion import nn as gnn
from guided_diffusion import unet as U
from guided_diffusion.train_util import _adamw_speed_options

# bfloat16 keeps 8 mantissa bits: relative error ~2^-8 per op; through a UNet the
# outputs differ from float32 by a few percent of their scale (documented in
# docs/performance.md).
BF16_TOLERANCE = 0.1


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_unet(**kw):
    """A 2-level, 32-channel UNet with attention at 8x8 for 16x16 inputs, every weight non-zero."""
    args = dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True,
    )
    args.update(kw)
    torch.manual_seed(0)
    model = U.UNetModel(**args)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.05))
    return model


def inputs(batch=2, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=gen), torch.tensor([3, 700][:batch])


# --------------------------------------------------------------------- switches


def test_env_var_turns_named_fast_paths_off(monkeypatch):
    monkeypatch.setenv(perf.ENV_VAR, "allocator, inplace")
    try:
        fastpaths._read_env()
        assert not perf.enabled("allocator") and not perf.enabled("inplace")
        assert perf.enabled("foreach")
    finally:
        monkeypatch.delenv(perf.ENV_VAR)
        fastpaths._read_env()
    assert all(perf.enabled(name) for name in perf.FAST_PATHS)


def test_unknown_fast_path_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown fast path.*'sdpaa'.*cpu_attention"):
        perf.disable("sdpaa")


def test_perf_switches_are_the_fast_path_registry():
    with perf.disabled("inplace"):
        assert not fastpaths.enabled("inplace")
    perf.disable("foreach")
    try:
        assert not fastpaths.enabled("foreach")
    finally:
        fastpaths.enable("foreach")
    assert perf.enabled("foreach")


def test_disabled_context_restores_the_switches():
    with perf.disabled("inplace"):
        assert not perf.enabled("inplace")
        with perf.disabled():
            assert not any(perf.enabled(n) for n in perf.FAST_PATHS)
        assert perf.enabled("foreach")
    assert perf.enabled("inplace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux only")
def test_allocator_tuning_is_applied_once_and_reports_it():
    U.UNetModel(16, 3, 32, 3, 1, ())
    assert perf.tune_allocator() is True
    assert perf.tune_allocator() is True  # idempotent


# --------------------------------------------------------------------- same numbers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_attention_is_the_original_formula_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 32, 64, generator=gen, dtype=dtype) for _ in range(3))
    assert torch.equal(U.attention(q, k, v), U.attention_reference(q, k, v))
    with perf.disabled("cpu_attention"):  # SDPA instead: the same values, another rounding
        torch.testing.assert_close(U.attention(q, k, v), U.attention_reference(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_new_attention_order", [False, True])
def test_unet_forward_is_the_same_with_every_fast_path_off(use_new_attention_order):
    model = tiny_unet(use_new_attention_order=use_new_attention_order).eval()
    x, t = inputs()
    with torch.no_grad():
        fast = model(x, t)
        with perf.disabled():
            plain = model(x, t)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(use_scale_shift_norm=False), dict(use_scale_shift_norm=True, resblock_updown=True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_adds_and_activations_change_no_bit(kw, channels_last):
    """Also in channels-last, where a sum's memory layout (which the next convolution's
    rounding depends on) follows its operands."""
    model = tiny_unet(**kw).eval()
    x, t = inputs()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = model(x, t)
        with perf.disabled("inplace"):
            plain = model(x, t)
    assert torch.equal(fast, plain)


def _loss_grads(model, x, t):
    """Parameter gradients of mean(model(x, t)^2), from zeroed gradients."""
    model.zero_grad()
    model(x, t).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_training_gradients_are_the_same_with_every_fast_path_off():
    model = tiny_unet()
    x, t = inputs()
    fast = _loss_grads(model, x, t)
    with perf.disabled():
        plain = _loss_grads(model, x, t)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ddim_samples_are_the_same_with_every_fast_path_off():
    model = tiny_unet().eval()
    diffusion = script_util.create_gaussian_diffusion(
        steps=40, learn_sigma=True, noise_schedule="cosine", timestep_respacing="ddim4"
    )

    def sample():
        torch.manual_seed(5)
        return diffusion.ddim_sample_loop(model, (2, 3, 16, 16))

    fast = sample()
    with perf.disabled():
        plain = sample()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_new_attention_order", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_token_major_attention_block_matches_the_module_by_module_forward(use_new_attention_order, channels_last):
    """The token-major path (GPUs, and CPU bfloat16 sampling) checked in float32 on CPU."""
    torch.manual_seed(0)
    block = U.AttentionBlock(64, num_heads=4, use_new_attention_order=use_new_attention_order).eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)  # not zero: the attention must count
    x = torch.randn(3, 64, 8, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = fastblocks._attention_block_tokens(block, x)
        plain = block(x)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    assert (fast - x).abs().max() > 0.1  # the block did change x
    # The output keeps the input's memory layout.
    assert fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_token_major_attention_is_for_bfloat16_sampling_on_cpu_and_steps_aside_for_hooks():
    block = U.AttentionBlock(64, num_heads=2)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        assert fastblocks._token_layout(block, x.bfloat16())
        for dtype in (torch.float16, torch.float32, torch.float64):  # the original's roundings
            assert not fastblocks._token_layout(block, x.to(dtype)), dtype
    assert not fastblocks._token_layout(block, x.bfloat16())  # CPU training keeps the [N, C, T] path
    seen = []
    handle = block.qkv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x.bfloat16())
    handle.remove()
    assert seen == [torch.Size([2, 192, 16])]


def test_token_major_attention_skips_subclassed_attention_modules():
    class Doubled(U.QKVAttention):
        def forward(self, qkv):
            return 2 * super().forward(qkv)

    block = U.AttentionBlock(64, num_heads=2, use_new_attention_order=True)
    x = torch.randn(2, 64, 4, 4).bfloat16()
    with torch.no_grad():
        assert fastblocks._token_layout(block, x)
        block.attention = Doubled(2)
        assert not fastblocks._token_layout(block, x)


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``fn()``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("kw", [dict(use_scale_shift_norm=True), dict(use_scale_shift_norm=False, resblock_updown=True,
                                                                      use_new_attention_order=True),
                                dict(use_scale_shift_norm=True, dropout=0.3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_recomputation_gives_the_same_gradients_bit_for_bit_and_keeps_less(kw, channels_last):
    model = tiny_unet(**kw)
    x, t = inputs()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        model.zero_grad()
        torch.manual_seed(3)  # the same dropout masks
        xx = x.clone().requires_grad_()
        out, saved = _saved_bytes(lambda: model(xx, t))
        out.square().mean().backward()
        return [out, xx.grad] + [p.grad.clone() for p in model.parameters()], saved

    fast, saved_fast = run()
    with perf.disabled("recompute"):
        plain, saved_plain = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    assert saved_fast < 0.9 * saved_plain, (saved_fast, saved_plain)


def test_recomputation_gives_input_gradients_through_a_frozen_model():
    """Classifier guidance and DPS take gradients w.r.t. the sample through frozen weights."""
    model = tiny_unet().requires_grad_(False)
    x, t = inputs()

    def grad_x():
        xx = x.clone().requires_grad_()
        model(xx, t).square().sum().backward()
        return xx.grad

    fast = grad_x()
    with perf.disabled("recompute"):
        plain = grad_x()
    assert torch.equal(fast, plain) and fast.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_recomputation_steps_aside_under_bf16_autocast():
    model = tiny_unet()
    x, t = inputs()

    def grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
        out.float().square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    fast = grads()
    with perf.disabled("recompute"):
        plain = grads()
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    assert kernels.group_norm_silu(gnn.normalization(32), torch.randn(1, 32, 2, 2)) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.group_norm_silu(gnn.normalization(32), torch.randn(1, 32, 2, 2)) is None


def test_group_norm_silu_falls_back_where_it_cannot_match_the_plain_layers():
    norm = gnn.normalization(32)
    x = torch.randn(2, 32, 4, 4)
    assert kernels.group_norm_silu(norm, x.double()) is None
    assert kernels.group_norm_silu(norm, x.transpose(2, 3)) is None  # neither NCHW nor channels-last
    out = kernels.group_norm_silu(norm, x)
    torch.testing.assert_close(out, torch.nn.functional.silu(norm(x)), rtol=0, atol=0)


def test_attention_recomputing_its_weights_matches_the_formula_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 8, 32, generator=gen) for _ in range(3))
    grads = []
    for fn in (lambda *qkv: kernels.recomputing(U.attention_reference, *qkv), U.attention_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) * torch.arange(32.0))
        grads.append([out] + [leaf.grad for leaf in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("num_heads, recomputed", [(16, True), (2, False)])
def test_attention_weights_are_recomputed_in_a_model_only_for_long_sequences(monkeypatch, num_heads, recomputed):
    """8x8 attention (T = 64) over 64 channels: 16 heads of 4 channels have T > 14C, 2 heads of 32 do not."""
    calls = []
    original = kernels.recomputing
    monkeypatch.setattr(kernels, "recomputing", lambda *a: calls.append(1) or original(*a))
    model = tiny_unet(num_heads=num_heads)
    x, t = inputs()
    fast = _loss_grads(model, x, t)
    assert bool(calls) is recomputed
    with perf.disabled("recompute"):
        plain = _loss_grads(model, x, t)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))


def test_uncached_coefficient_tables_give_the_same_values():
    diffusion = script_util.create_gaussian_diffusion(steps=50, noise_schedule="linear")
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 17, 49])
    fast = diffusion.q_posterior_mean_variance(x, x * 0.5, t)
    with perf.disabled("cached_tables"):
        plain = diffusion.q_posterior_mean_variance(x, x * 0.5, t)
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)


def test_foreach_adamw_rounds_exactly_like_the_per_tensor_loop():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in [(8, 3, 3, 3), (8,), (16, 8, 1, 1)]]
    results = []
    for foreach in (True, False):
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=foreach)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            opt.step()
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert _adamw_speed_options() == {"foreach": True}
    assert _adamw_speed_options(fused=True) == {"fused": True}


def test_foreach_ema_equals_the_per_tensor_update():
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen)]
    fast = [torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen)]
    start = [t.clone() for t in fast]
    plain = [t.clone() for t in fast]
    gnn.update_ema(fast, sources, rate=0.9)
    with perf.disabled("foreach"):
        gnn.update_ema(plain, sources, rate=0.9)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    torch.testing.assert_close(fast[1], 0.9 * start[1] + 0.1 * sources[1])


def _train_with_trainer(steps):
    """AdamW steps through MixedPrecisionTrainer on a tiny UNet plus one extra parameter that
    only the first step uses (so later steps must still decay it as a zero-gradient parameter)."""
    from guided_diffusion.fp16_util import MixedPrecisionTrainer

    model = tiny_unet()
    model.extra = torch.nn.Parameter(torch.ones(3))
    trainer = MixedPrecisionTrainer(model=model)
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-3, weight_decay=0.1)
    x, t = inputs()
    grads_after_zero = []
    for step in range(steps):
        trainer.zero_grad()
        grads_after_zero.append([None if p.grad is None else bool(p.grad.any()) for p in trainer.model_params])
        loss = model(x, t).square().mean()
        if step == 0:
            loss = loss + model.extra.square().sum()
        trainer.backward(loss)
        trainer.optimize(opt)
    return [p.detach().clone() for p in trainer.master_params], grads_after_zero, model.extra


def test_released_gradients_train_to_the_same_bits_as_zeroed_ones():
    fast, fast_grads, fast_extra = _train_with_trainer(3)
    with perf.disabled("release_grads"):
        plain, plain_grads, plain_extra = _train_with_trainer(3)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    # The extra parameter got no gradient after step 1, yet kept decaying and moving on its moments.
    assert not torch.equal(fast_extra, torch.ones(3)) and torch.equal(fast_extra, plain_extra)
    # What the fast path is for: no gradient buffers alive between zero_grad and backward.
    assert all(g is None for g in fast_grads[1])
    assert all(g is False for g in plain_grads[1])


# --------------------------------------------------------------------- hooks see what a layer returned


def _capture(module, store):
    def hook(_module, _inputs, output):
        store.append((output, output.detach().clone()))

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_forward_hooks_on_inner_layers_see_unmodified_outputs(grad, scale_shift):
    model = tiny_unet(use_scale_shift_norm=scale_shift)
    block = model.input_blocks[1][0]
    attn = model.input_blocks[3][1]
    layers = [block.in_layers[0], block.in_layers, block.in_layers[-1], block.out_layers[0], block.out_layers[-1],
              attn.proj_out, model.out[0]]
    stores = [[] for _ in layers]
    handles = [_capture(layer, store) for layer, store in zip(layers, stores)]
    x, t = inputs()
    with torch.set_grad_enabled(grad):
        model(x, t)
    for handle in handles:
        handle.remove()
    for layer, store in zip(layers, stores):
        assert store, layer
        for seen, copy in store:
            assert torch.equal(seen, copy), f"{type(layer).__name__}'s output was changed after its hook ran"


def test_global_forward_hooks_also_keep_outputs_unmodified():
    model = tiny_unet().eval()
    seen = []

    def hook(module, _inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.append((output, output.clone()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            model(*inputs())
    finally:
        handle.remove()
    assert seen and all(torch.equal(a, b) for a, b in seen)


# --------------------------------------------------------------------- opt-in flags


def _perf_args(argv, training=False):
    parser = argparse.ArgumentParser()
    perf.add_perf_flags(parser, training=training)
    return parser.parse_args(argv)


def test_perf_flags_default_off_and_accept_bare_or_explicit_values():
    args = _perf_args([], training=True)
    assert vars(args) == perf.perf_defaults(training=True)
    assert not any(vars(args).values())
    args = _perf_args(["--compile", "--channels_last", "True", "--use_bf16", "false", "--fused_adam"], training=True)
    assert (args.compile, args.channels_last, args.use_bf16, args.fused_adam) == (True, True, False, True)


def test_training_and_sampling_scripts_have_the_perf_flags():
    sys.path.insert(0, "scripts")
    try:
        import image_nll
        import image_sample
        import image_train
    finally:
        sys.path.remove("scripts")
    train = image_train.create_argparser().parse_args(["--compile", "--use_bf16", "True", "--tf32"])
    assert train.compile and train.use_bf16 and train.tf32 and not train.fused_adam
    assert not train.cudnn_benchmark
    sample = image_sample.create_argparser().parse_args(["--channels_last", "--cudnn_benchmark"])
    assert sample.channels_last and sample.cudnn_benchmark and not sample.compile
    nll = image_nll.create_argparser().parse_args(["--use_bf16"])
    assert nll.use_bf16


def test_cudnn_benchmark_flag_switches_autotuning_on_and_never_off():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        perf.configure_backends(_perf_args([]), "cpu")
        assert torch.backends.cudnn.benchmark is False
        perf.configure_backends(_perf_args(["--cudnn_benchmark"]), "cpu")
        assert torch.backends.cudnn.benchmark is True
        perf.configure_backends(_perf_args([]), "cpu")  # a caller's own choice stays
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_channels_last_reaches_the_model_and_keeps_float32_numbers():
    model = tiny_unet().eval()
    x, t = inputs()
    with torch.no_grad():
        plain = model(x, t)
        fn = perf.inference_model(model, _perf_args(["--channels_last"]), "cpu")
        assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        fast = fn(x, t)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_reaches_the_model_within_its_tolerance():
    model = tiny_unet().eval()
    x, t = inputs()
    with torch.no_grad():
        plain = model(x, t)
        fn = perf.inference_model(model, _perf_args(["--use_bf16"]), "cpu")
        assert isinstance(fn, perf.AutocastModel)
        low = fn(x, t)
    assert low.dtype == torch.float32
    error = (low - plain).abs().max() / plain.abs().max()
    assert 0 < error < BF16_TOLERANCE


def test_bf16_and_fp16_together_are_refused_naming_both_flags():
    with pytest.raises(ValueError, match="--use_bf16 and --use_fp16"):
        perf.check_flags(argparse.Namespace(use_bf16=True, use_fp16=True), torch.device("cpu"))


def _tiny_loop(log_dir, model, **options):
    """A TrainLoop over ``model`` (batch 2, 20 cosine steps) that is driven by run_step calls."""
    from guided_diffusion import logger
    from guided_diffusion.train_util import TrainLoop

    logger.configure(dir=str(log_dir), format_strs=["log"])
    diffusion = script_util.create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
    return TrainLoop(
        model=model, diffusion=diffusion, data=iter([]), batch_size=2, microbatch=-1, lr=1e-3,
        ema_rate="0.9", log_interval=100, save_interval=100, resume_checkpoint="", **options,
    )


def test_trainloop_takes_a_bf16_step(tmp_path):
    model = tiny_unet()
    x, _ = inputs(batch=2)
    before = [p.detach().clone() for p in model.parameters()]
    loop = _tiny_loop(tmp_path, model, use_bf16=True)
    loop.run_step(x, {})
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.dtype == torch.float32 for p in after)


def test_fused_adamw_runs_on_cpu_and_stays_within_rounding_of_the_default(tmp_path):
    from guided_diffusion.train_util import seed_all

    x, _ = inputs(batch=2)
    results = []
    for fused in (True, False):
        model = tiny_unet()
        loop = _tiny_loop(tmp_path, model, fused_adam=fused)
        assert loop.opt.defaults["fused"] is (True if fused else None)
        seed_all(5)  # the same timesteps (numpy) and noise (torch) for both runs
        before = [p.detach().clone() for p in model.parameters()]
        loop.run_step(x, {})
        results.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    # One step from the same gradients: the updates (about lr in size) agree to float32 rounding.
    # An update is read back as p_new - p_old, so it carries the rounding of p itself: one
    # unit in the last place of the largest parameter (the two kernels may round p apart).
    ulp = torch.finfo(torch.float32).eps * max(float(p.abs().max()) for p in model.parameters())
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2 * ulp)
    assert max(u.abs().max() for u in results[0]) > 1e-4
