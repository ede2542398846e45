"""The FID InceptionV3 network with random weights: shapes, determinism, layers, weights file."""

import copy
import hashlib

import numpy as np
import pytest
import scipy.stats
import torch

from evaluations import inception
from evaluations.evaluator import Evaluator
from evaluations.inception import (
    WEIGHTS_ENV,
    WEIGHTS_FILENAME,
    InceptionV3,
    InceptionWeightsError,
    load_inception,
    resize_bilinear_tf1,
)

torch.set_num_threads(1)


def _random_network(seed=0):
    torch.manual_seed(seed)
    net = InceptionV3()
    with torch.no_grad():  # non-trivial batch-norm statistics, so every parameter matters
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return _random_network()


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(np.random.RandomState(0).randint(0, 256, size=(2, 3, 32, 32)).astype(np.float32))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, net):
    path = tmp_path_factory.mktemp("weights") / WEIGHTS_FILENAME
    torch.save(net.state_dict(), path)
    return path


def test_outputs_have_the_fid_shapes(net, images):
    with torch.no_grad():
        out = net(images)
    assert out.pool.shape == (2, 2048)
    assert out.spatial.shape == (2, 7 * 17 * 17)
    assert out.logits.shape == (2, 1008)
    assert all(t.dtype == torch.float32 for t in out)


def test_forward_is_deterministic_and_independent_of_the_batch(net, images):
    with torch.no_grad():
        first, second, alone = net(images), net(images), net(images[1:])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.testing.assert_close(alone.pool[0], first.pool[1], rtol=1e-4, atol=1e-5)


def test_spatial_features_are_the_first_seven_channels_of_mixed_6d_branch1x1(net, images):
    captured = {}
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("map", o))
    try:
        with torch.no_grad():
            out = net(images)
    finally:
        handle.remove()
    assert inception.SPATIAL_LAYER == "Mixed_6d.branch1x1"
    assert captured["map"].shape == (2, 192, 17, 17)
    # TF hands mixed_6/conv over as NHWC and the original flattens it as it is: (h, w, c).
    assert torch.equal(out.spatial, captured["map"][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert not torch.equal(out.spatial, captured["map"][:, :7].reshape(2, -1))
    assert (out.spatial >= 0).all()  # taken after the ReLU, like TF's mixed_6/conv


def test_logits_are_the_classifier_applied_to_pool_features(net, images):
    with torch.no_grad():
        out = net(images)
    torch.testing.assert_close(out.logits, out.pool @ net.fc.weight.T + net.fc.bias)


def test_state_dict_uses_torchvision_names_without_aux_logits(net):
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6d.branch7x7dbl_5.conv.weight"] == (192, 160, 1, 7)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert not any(k.startswith("AuxLogits") for k in shapes)
    assert "Conv2d_1a_3x3.conv.bias" not in shapes


def test_pools_of_the_inner_blocks_ignore_padding():
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(inception._avg_pool_no_pad(ones), ones)  # a padded mean would darken the border


def test_last_block_max_pools_and_the_others_average(net):
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 0] = 9.0
    assert net.Mixed_7c.pool(x)[0, 0, 1, 1] == 9.0
    assert net.Mixed_7b.pool(x)[0, 0, 1, 1] == 1.0


def _tf1_resize_reference(image, out_h, out_w):
    """Independent loop version of TF1 ResizeBilinear(align_corners=False)."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * in_h / out_h
        y0, dy = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, in_h - 1)
        for j in range(out_w):
            x = j * in_w / out_w
            x0, dx = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, in_w - 1)
            top = image[y0, x0] * (1 - dx) + image[y0, x1] * dx
            bottom = image[y1, x0] * (1 - dx) + image[y1, x1] * dx
            out[i, j] = top * (1 - dy) + bottom * dy
    return out


@pytest.mark.parametrize("in_size,out_size", [(5, 7), (8, 3), (6, 6)])
def test_resize_matches_tensorflow_1_bilinear(in_size, out_size):
    image = np.random.RandomState(in_size).uniform(0, 255, size=(in_size, in_size))
    got = resize_bilinear_tf1(torch.tensor(image, dtype=torch.float32)[None, None], out_size)[0, 0]
    np.testing.assert_allclose(got.numpy(), _tf1_resize_reference(image, out_size, out_size), rtol=1e-5, atol=1e-3)


def test_resize_to_the_same_size_is_the_identity():
    x = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(resize_bilinear_tf1(x, 299), x)


# -- the weights file ---------------------------------------------------------


def test_weights_with_a_wrong_sha256_are_refused(weights_file):
    with pytest.raises(InceptionWeightsError, match=f"sha256 .*expected {inception.WEIGHTS_SHA256}"):
        load_inception(str(weights_file), allow_unverified=False)


def test_weights_whose_sha256_matches_load_exactly(weights_file, net, images, monkeypatch):
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", digest)
    loaded = load_inception(str(weights_file))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).pool, net(images).pool, rtol=0, atol=0)


def test_unverified_weights_load_only_when_allowed_with_a_warning(weights_file, monkeypatch):
    monkeypatch.setenv(inception.ALLOW_UNVERIFIED_ENV, "1")
    with pytest.warns(UserWarning, match="NOT comparable"):
        model = load_inception(str(weights_file))
    assert not model.training


def test_missing_weights_file_says_which_file_and_where_it_is_published(tmp_path):
    with pytest.raises(InceptionWeightsError) as info:
        load_inception(str(tmp_path / "absent.pth"))
    message = str(info.value)
    assert "absent.pth" in message and WEIGHTS_FILENAME in message
    assert "pytorch-fid" in message and "fid_weights" in message and inception.WEIGHTS_URL in message
    assert "--inception_weights" in message and WEIGHTS_ENV in message


def test_no_weights_given_names_the_flag_and_environment_variable(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError, match=f"neither --inception_weights nor {WEIGHTS_ENV}"):
        load_inception()


def test_weights_path_comes_from_the_environment_or_a_folder(weights_file, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_file.parent))  # a folder holding the file
    assert inception.resolve_weights_path() == str(weights_file)


def test_a_file_with_other_keys_is_refused_with_the_key_differences(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048), "extra": torch.zeros(1)}, path)
    with pytest.raises(InceptionWeightsError, match=r"missing keys: .*unexpected keys: extra.*wrong shapes: fc.weight"):
        load_inception(str(path), verify=False)


def test_evaluator_extracts_features_from_nhwc_uint8_batches(net):
    batch = np.random.RandomState(1).randint(0, 256, size=(2, 32, 32, 3)).astype(np.uint8)
    evaluator = Evaluator(net, device="cpu", progress=False)
    pool, spatial = evaluator.compute_activations([batch[:1], batch[1:]])
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and pool.dtype == np.float32
    with torch.no_grad():
        direct = net(torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2))
    np.testing.assert_allclose(pool, direct.pool.numpy(), rtol=1e-4, atol=1e-5)


def test_evaluator_rejects_channel_first_batches(net):
    with pytest.raises(ValueError, match="N x H x W x 3"):
        Evaluator(net, device="cpu", progress=False).compute_activations([np.zeros((1, 3, 8, 8))])


def test_evaluator_inception_score_uses_the_classifier_weight_without_bias(net):
    net = copy.deepcopy(net)
    acts = np.random.RandomState(2).uniform(0, 50, size=(12, 2048)).astype(np.float32)
    with torch.no_grad():
        net.fc.bias[0] = 100.0  # would make every prediction class 0 if it were used
        probs = torch.softmax(torch.from_numpy(acts) @ net.fc.weight.T, dim=1).numpy()
    marginal = probs.mean(0)
    expected = np.exp(np.mean([scipy.stats.entropy(p, marginal) for p in probs.astype(np.float64)]))
    score = Evaluator(net, device="cpu", softmax_batch_size=5).compute_inception_score(acts, split_size=12)
    assert score > 1.5  # far from the score of 1 that a dominating bias would give
    assert score == pytest.approx(expected, rel=1e-5)
