"""Code written against the original's signatures binds the same way against ours.

tests/golden/api_signatures.json lists every public function, class and method of
the original (PyPI guided-diffusion-sdk 1.0.0) with its parameters. Ours must have
each of them; every parameter the original has must be there too, at the same
position when it can be passed by position, with the same default (or a default
where the original has none). Ours may add
parameters only after the original's positional ones, and only with defaults.
"""

import json
from pathlib import Path

import pytest

import guided_diffusion
from golden import api_signatures

GOLDEN = Path(__file__).parent / "golden"
ORIGINAL = json.loads((GOLDEN / "api_signatures.json").read_text())

# Private names that downstream projects call anyway (API.md); other private names are ours to change.
USED_PRIVATES = {
    "gaussian_diffusion._extract_into_tensor",
    "gaussian_diffusion.GaussianDiffusion._predict_xstart_from_eps",
    "gaussian_diffusion.GaussianDiffusion._predict_eps_from_xstart",
    "gaussian_diffusion.GaussianDiffusion._predict_xstart_from_xprev",
    "gaussian_diffusion.GaussianDiffusion._vb_terms_bpd",
    "gaussian_diffusion.GaussianDiffusion._prior_bpd",
    "gaussian_diffusion.GaussianDiffusion._scale_timesteps",
    "respace.SpacedDiffusion._wrap_model",
    "respace._WrappedModel",
    "respace._WrappedModel.__init__",
    "respace._WrappedModel.__call__",
}

# Where ours differs on purpose, and why.
DIFFERENT_ON_PURPOSE = {
    # torch.nn.SiLU's own constructor (inplace=False); the original's took *args, **kwargs it ignored.
    "nn.SiLU.__init__": "torch's SiLU signature",
    # The original's hand-written autograd checkpoint; ours checkpoints with torch.utils.checkpoint
    # behind the same nn.checkpoint(func, inputs, params, flag).
    "nn.CheckpointFunction": "implementation detail of nn.checkpoint",
    "nn.CheckpointFunction.forward": "implementation detail of nn.checkpoint",
    "nn.CheckpointFunction.backward": "implementation detail of nn.checkpoint",
}


OURS = api_signatures.dump(guided_diffusion)


def _is_private(name):
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


CHECKED = sorted(
    name for name in ORIGINAL
    if (name in USED_PRIVATES or not _is_private(name)) and name not in DIFFERENT_ON_PURPOSE
)

POSITIONAL = {"POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD"}


def _default(text):
    # A mutable default list in the original may be an immutable tuple here.
    if text and text[0] == "(" and text[-1] == ")":
        return "[" + text[1:-1].rstrip(",") + "]"
    return text


def test_the_recorded_surface_covers_the_documented_modules():
    modules = {name.split(".")[0] for name in CHECKED}
    assert modules >= {"gaussian_diffusion", "respace", "unet", "script_util", "train_util", "logger"}
    assert len(CHECKED) > 200


@pytest.mark.parametrize("name", CHECKED)
def test_original_signature_binds_the_same_way(name):
    assert name in OURS, f"{name} is missing"
    original, ours = ORIGINAL[name], OURS[name]
    if original == "class" or original is None:
        assert ours == original
        return
    by_name = {p[0]: (i, p) for i, p in enumerate(ours)}
    for index, (param, kind, default) in enumerate(original):
        if kind in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            assert any(p[1] == kind for p in ours), f"{name}: ours takes no {kind} ({param})"
            continue
        assert param in by_name, f"{name}: parameter {param!r} is missing"
        position, (_, our_kind, our_default) = by_name[param]
        if kind in POSITIONAL:
            assert position == index and our_kind in POSITIONAL, (
                f"{name}: {param!r} must stay positional parameter {index}"
            )
        else:
            assert our_kind in ("KEYWORD_ONLY", "POSITIONAL_OR_KEYWORD"), f"{name}: {param!r} must be a keyword"
        # A parameter the original requires may get a default here; a default must not change.
        if default is not None:
            assert _default(our_default) == _default(default), (
                f"{name}: default of {param!r} is {our_default}, the original's {default}"
            )
    known = {p[0] for p in original}
    for param, kind, default in ours:
        if param not in known and kind not in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            assert default is not None, f"{name}: added parameter {param!r} needs a default"
