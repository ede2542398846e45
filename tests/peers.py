"""Independent implementations used as references by the tests, loaded without their heavy dependencies.

k-diffusion's samplers (``k_diffusion/sampling.py``) need only torch and scipy at run
time, but the package imports torchvision, torchsde and torchdiffeq at import time, and
installing it normally pulls in a CUDA build of torch. So its wheel is fetched without
dependencies (``pip download --no-deps``) into a cache folder, and its sampling module
is imported under a bare package with stand-ins for the modules the samplers used here
never call.
"""

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

KDIFFUSION = "k-diffusion==0.1.1.post1"
CACHE = Path(os.environ.get("GUIDED_DIFFUSION_CACHE", Path.home() / ".cache" / "guided_diffusion")) / "peers"


def _kdiffusion_dir():
    """The folder holding k_diffusion/ (an installed copy, else the fetched wheel); None offline."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent
    target = CACHE / "k_diffusion_wheel"
    if not (target / "k_diffusion" / "sampling.py").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(CACHE), KDIFFUSION],
            capture_output=True, text=True, timeout=300,
        )
        wheels = sorted(CACHE.glob("k_diffusion-*.whl"))
        if done.returncode != 0 or not wheels:
            return None
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(target)
    return target


def _stand_in(name, **attributes):
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        # A spec, so that importlib.util.find_spec (diffusers probes optional packages
        # with it) answers for a stand-in instead of raising on a missing __spec__.
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attributes)
        sys.modules[name] = module
    return module


def kdiffusion_sampling():
    """k-diffusion's ``sampling`` module, or None when it cannot be had (offline)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    root = _kdiffusion_dir()
    if root is None:
        return None
    # What k_diffusion.utils and .sampling import but the ODE samplers never use.
    for name in ("torchvision", "torchvision.transforms"):
        _stand_in(name)
    _stand_in("torchvision.transforms.functional")
    _stand_in("torchdiffeq", odeint=None)
    _stand_in("torchsde", BrownianTree=None)
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root / "k_diffusion")]
    sys.modules["k_diffusion"] = package
    spec = importlib.util.spec_from_file_location("k_diffusion.sampling", root / "k_diffusion" / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["k_diffusion.sampling"] = module
    spec.loader.exec_module(module)
    return module


# diffusers and what it imports, none of which pulls torch: fetched as wheels without
# dependencies and unpacked into one folder put at the end of sys.path (the venv's own
# packages win), so installing them never replaces the venv's torch.
DIFFUSERS = (
    "diffusers==0.42.1", "huggingface_hub==2.4.0", "requests==2.34.2", "idna==3.21", "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3", "regex==2026.12.2", "pyyaml==6.0.4", "importlib_metadata==10.2.0", "zipp==4.1.2",
    "httpx2==2.17.0", "httpcore2==2.17.0", "h11==0.16.0", "anyio==4.16.0", "truststore==0.10.5",
    "lazy-importer==0.1.0", "hf-xet==1.8.0",
)


def _diffusers_dir():
    target = CACHE / "diffusers_site"
    if (target / "diffusers" / "__init__.py").exists():
        return target
    wheels_dir = CACHE / "diffusers_wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels_dir), *DIFFUSERS],
        capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0:
        return None
    staging = CACHE / "diffusers_site.partial"
    for wheel in sorted(wheels_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging)
    staging.rename(target)
    return target


def diffusers():
    """The diffusers package (``UNet2DModel``, ``DDPMScheduler``), or None when it cannot be had (offline)."""
    if importlib.util.find_spec("diffusers") is None:
        root = _diffusers_dir()
        if root is None:
            return None
        sys.path.append(str(root))
    import diffusers as module

    return module
