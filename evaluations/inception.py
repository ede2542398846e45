"""The FID Inception network: TensorFlow's 2015-12-05 InceptionV3 graph, in PyTorch.

OpenAI's evaluator runs ``classify_image_graph_def.pb``, the InceptionV3 graph
TensorFlow published on 2015-12-05 (the graph behind every FID number since
Heusel et al. 2017). This module rebuilds that graph with torch modules and
loads its weights from the public PyTorch conversion
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release ``fid_weights``;
keys in torchvision's ``Inception3`` naming, 1008-way classifier).

The graph differs from torchvision's ``Inception3``:

* inputs in [0, 255] of any size are resized to 299x299 with TensorFlow 1's
  bilinear resize (``align_corners=False`` without half-pixel centres: output
  pixel ``i`` samples input position ``i * in / 299``), then mapped to
  ``(x - 128) / 128``;
* the average pools of the 35x35 (``Mixed_5*``), 17x17 (``Mixed_6b-e``) and
  first 8x8 (``Mixed_7b``) blocks exclude the zero padding from their mean;
* the last block (``Mixed_7c``) max-pools its pool branch instead of averaging;
* the classifier has 1008 outputs.

Outputs (``InceptionOutputs``): ``pool`` [N, 2048] (TF ``pool_3``, for FID),
``spatial`` [N, 2023] (the first 7 channels of TF ``mixed_6/conv``, 17x17,
flattened in TF's NHWC order, i.e. (h, w, c), for sFID: see ``spatial_features``)
and ``logits`` [N, 1008] (TF ``softmax/logits``).
TF ``mixed_6/conv`` is the ReLU output of the 1x1 branch of the third 17x17
block, ``Mixed_6d.branch1x1`` here (docs/evaluation.md gives the sources).
"""

import os
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluations.activations import sha256_file

__all__ = [
    "WEIGHTS_FILENAME",
    "WEIGHTS_URL",
    "WEIGHTS_SHA256",
    "WEIGHTS_ENV",
    "ALLOW_UNVERIFIED_ENV",
    "SPATIAL_LAYER",
    "SPATIAL_CHANNELS",
    "InceptionWeightsError",
    "InceptionOutputs",
    "InceptionV3",
    "resize_bilinear_tf1",
    "spatial_features",
    "resolve_weights_path",
    "verify_weights_file",
    "load_inception",
]

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
# torch.hub convention: the file name carries the first 8 hex digits of the sha256.
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "GUIDED_DIFFUSION_INCEPTION_WEIGHTS"
# Test-only escape hatch: accept a weights file whose digest does not match.
ALLOW_UNVERIFIED_ENV = "GUIDED_DIFFUSION_ALLOW_UNVERIFIED_INCEPTION"

INPUT_SIZE = 299
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
NUM_LOGITS = 1008


class InceptionWeightsError(RuntimeError):
    """The Inception weights file is missing, corrupt or not the expected one."""


class InceptionOutputs(NamedTuple):
    pool: torch.Tensor  # [N, 2048]
    spatial: torch.Tensor  # [N, SPATIAL_CHANNELS * 17 * 17]
    logits: torch.Tensor  # [N, 1008]


# ---------------------------------------------------------------------------
# Input pipeline of the TF graph
# ---------------------------------------------------------------------------


def _tf1_lerp_indices(in_size: int, out_size: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = in_size / out_size
    src = torch.arange(out_size, device=device, dtype=torch.float32) * scale
    low = torch.floor(src)
    frac = src - low
    low = low.long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    return low, high, frac


def resize_bilinear_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TensorFlow 1 ``ResizeBilinear`` (align_corners=False, no half-pixel centres).

    :param images: [N, C, H, W] float tensor.
    :return: [N, C, size, size]; output pixel ``i`` reads input position
             ``i * H / size``, interpolating between its floor and the next
             pixel (clamped at the border).
    """
    _, _, height, width = images.shape
    y0, y1, ylerp = _tf1_lerp_indices(height, size, images.device)
    x0, x1, xlerp = _tf1_lerp_indices(width, size, images.device)
    top, bottom = images[:, :, y0, :], images[:, :, y1, :]
    top_left, top_right = top[..., x0], top[..., x1]
    bottom_left, bottom_right = bottom[..., x0], bottom[..., x1]
    top = top_left + (top_right - top_left) * xlerp
    bottom = bottom_left + (bottom_right - bottom_left) * xlerp
    return top + (bottom - top) * ylerp[:, None]


def spatial_features(feature_map: torch.Tensor) -> torch.Tensor:
    """sFID features of an NCHW ``mixed_6/conv`` map: [N, SPATIAL_CHANNELS * H * W].

    The original slices ``spatial[..., :7]`` of TensorFlow's NHWC tensor and
    reshapes it to ``[N, -1]``, so the vector runs over (h, w, c) with the channel
    fastest. FID statistics are not invariant to that permutation once they are
    compared with precomputed ``mu_s``/``sigma_s`` (OpenAI's reference batches),
    so the order is part of the metric.
    """
    return feature_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(start_dim=1)


# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TF's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that averages only over real (unpadded) pixels, as TF does."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _max_pool_reduce(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


class _InceptionBlock(nn.Module):
    """A block = parallel branches concatenated on channels.

    Subclasses register their convolutions under torchvision's names (the keys
    of the weights file) and return their branch outputs, in concatenation
    order, from ``branch_outputs``.
    """

    def branch_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branch_outputs(x), dim=1)


class InceptionA(_InceptionBlock):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def branch_outputs(self, x):
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_no_pad(x)),
        ]


class InceptionB(_InceptionBlock):
    """35x35 -> 17x17 reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def branch_outputs(self, x):
        return [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _max_pool_reduce(x),
        ]


class InceptionC(_InceptionBlock):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row = dict(kernel_size=(1, 7), padding=(0, 3))
        col = dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branch_outputs(self, x):
        dbl = x
        for name in ("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"):
            dbl = getattr(self, name)(dbl)
        return [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool_no_pad(x)),
        ]


class InceptionD(_InceptionBlock):
    """17x17 -> 8x8 reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def branch_outputs(self, x):
        tower = x
        for name in ("branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"):
            tower = getattr(self, name)(tower)
        return [self.branch3x3_2(self.branch3x3_1(x)), tower, _max_pool_reduce(x)]


class InceptionE(_InceptionBlock):
    """8x8 block with split 1x3 / 3x1 outputs; ``pool`` picks the pool branch's pooling."""

    def __init__(self, in_channels: int, pool):
        super().__init__()
        row = dict(kernel_size=(1, 3), padding=(0, 1))
        col = dict(kernel_size=(3, 1), padding=(1, 0))
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branch_outputs(self, x):
        t = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], dim=1),
            torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], dim=1),
            self.branch_pool(self.pool(x)),
        ]


class InceptionV3(nn.Module):
    """TensorFlow's 2015-12-05 InceptionV3 (the FID network); see the module docstring.

    ``forward(images)`` takes [N, 3, H, W] float images in [0, 255] (any H, W)
    and returns ``InceptionOutputs(pool, spatial, logits)``.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=_avg_pool_no_pad)
        self.Mixed_7c = InceptionE(2048, pool=_max_pool_same)
        self.fc = nn.Linear(2048, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"InceptionV3 expects RGB images [N, 3, H, W] in [0, 255], got shape "
                f"{tuple(images.shape)} (NHWC arrays must be permuted to NCHW first)."
            )
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_reduce(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool_reduce(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d.branch_outputs(x)
        spatial = spatial_features(branches[0])  # TF mixed_6/conv
        x = torch.cat(branches, dim=1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = torch.mean(x, dim=(2, 3))  # TF pool_3: 8x8 average
        return InceptionOutputs(pool=pool, spatial=spatial, logits=self.fc(pool))


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def _missing_weights_message(detail: str) -> str:
    return (
        f"{detail}\nThe evaluator needs the Inception weights file {WEIGHTS_FILENAME} "
        f"(about 95 MB), the PyTorch conversion of TensorFlow's 2015-12-05 InceptionV3 graph, "
        f"published by the pytorch-fid project in its GitHub release 'fid_weights':\n"
        f"  {WEIGHTS_URL}\n"
        f"Download it once, then pass --inception_weights PATH or set {WEIGHTS_ENV}=PATH. "
        "Nothing is downloaded at run time."
    )


def resolve_weights_path(path: Optional[str] = None) -> str:
    """The weights path from the argument, else ``$GUIDED_DIFFUSION_INCEPTION_WEIGHTS``.

    Raises ``InceptionWeightsError`` naming the file and where it is published
    when neither is given or the file does not exist.
    """
    source = "--inception_weights"
    if not path:
        path, source = os.environ.get(WEIGHTS_ENV, ""), WEIGHTS_ENV
    if not path:
        raise InceptionWeightsError(
            _missing_weights_message(f"No Inception weights given (neither --inception_weights nor {WEIGHTS_ENV})."),
        )
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_FILENAME)
    if not os.path.isfile(path):
        raise InceptionWeightsError(_missing_weights_message(f"Inception weights file not found: {path} (from {source})."))
    return path


def verify_weights_file(path: str, allow_unverified: Optional[bool] = None) -> str:
    """Check the sha256 of ``path`` against the published file's; return the digest.

    A mismatch raises ``InceptionWeightsError``, unless ``allow_unverified``
    (default: ``$GUIDED_DIFFUSION_ALLOW_UNVERIFIED_INCEPTION`` set to 1) turns
    it into a warning; that is meant for tests with random weights only, since
    scores from other weights are not comparable with published numbers.
    """
    if allow_unverified is None:
        allow_unverified = os.environ.get(ALLOW_UNVERIFIED_ENV, "") not in ("", "0")
    digest = sha256_file(path)
    if digest != WEIGHTS_SHA256:
        message = (
            f"Inception weights {path} have sha256 {digest}, expected {WEIGHTS_SHA256} "
            f"(the file {WEIGHTS_FILENAME}; torch.hub names files by the first 8 hex digits "
            f"of their sha256). The file is corrupt or a different network; download it "
            f"again from {WEIGHTS_URL}."
        )
        if not allow_unverified:
            raise InceptionWeightsError(message)
        warnings.warn(message + f" Continuing because {ALLOW_UNVERIFIED_ENV} is set: scores are NOT comparable.")
    return digest


def _check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v.shape for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(given) if tuple(expected[k]) != tuple(given[k]))
    if missing or unexpected or misshaped:
        def preview(keys: Sequence[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {preview(unexpected)}")
        if misshaped:
            parts.append(
                "wrong shapes: "
                + preview([f"{k} {tuple(given[k])} vs {tuple(expected[k])}" for k in misshaped])
            )
        raise InceptionWeightsError(
            f"{path} does not hold the FID InceptionV3 weights ({'; '.join(parts)}). "
            f"Use {WEIGHTS_FILENAME} from {WEIGHTS_URL}."
        )


def load_inception(
    weights_path: Optional[str] = None,
    device=None,
    *,
    verify: bool = True,
    allow_unverified: Optional[bool] = None,
) -> InceptionV3:
    """Build ``InceptionV3``, load the verified weights, move it to ``device``, eval mode.

    :param weights_path: the ``.pth`` file (or a folder holding it); default
                         ``$GUIDED_DIFFUSION_INCEPTION_WEIGHTS``.
    :param verify: check the file's sha256 (see ``verify_weights_file``).
    """
    path = resolve_weights_path(weights_path)
    if verify:
        verify_weights_file(path, allow_unverified=allow_unverified)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise InceptionWeightsError(
            f"could not read Inception weights {path}: {exc}. Download {WEIGHTS_FILENAME} "
            f"again from {WEIGHTS_URL}."
        ) from exc
    if not isinstance(state_dict, dict):
        raise InceptionWeightsError(
            f"{path} holds a {type(state_dict).__name__}, not a state_dict of tensors; use "
            f"{WEIGHTS_FILENAME} from {WEIGHTS_URL}."
        )
    model = InceptionV3()
    _check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=False)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model
