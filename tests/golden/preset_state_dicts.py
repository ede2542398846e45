"""Record the state_dict keys and shapes of every preset's network (tests/golden/preset_state_dicts.json):
per preset, the number of tensors and a sha256 of the sorted "key shape" lines.

Built on the meta device (no memory, no weights). Run from a checkout whose networks
are the reference, e.g. before a change to the architecture code:

    PYTHONPATH=<that checkout> python tests/golden/preset_state_dicts.py
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from guided_diffusion import presets, script_util

BUILDERS = {
    "diffusion": (script_util.model_and_diffusion_defaults, script_util.create_model_and_diffusion),
    "super-res": (script_util.sr_model_and_diffusion_defaults, script_util.sr_create_model_and_diffusion),
    "classifier": (script_util.classifier_and_diffusion_defaults, script_util.create_classifier_and_diffusion),
}


def preset_network(name):
    """The network of preset ``name``, on the meta device."""
    preset = presets.PRESETS[name]
    defaults, build = BUILDERS[preset["kind"]]
    flags = {**defaults(), **{k: v for k, v in preset["flags"].items() if k in defaults()}}
    with torch.device("meta"):
        return build(**flags)[0]


def fingerprint(name):
    """{"tensors": count, "sha256": digest of the sorted "key shape" lines} of preset ``name``'s state_dict."""
    lines = sorted(f"{key} {tuple(value.shape)}" for key, value in preset_network(name).state_dict().items())
    return {"tensors": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("preset_state_dicts.json")
    out.write_text(json.dumps({name: fingerprint(name) for name in presets.PRESETS}, indent=1, sort_keys=True))
    print(f"wrote {out}")
