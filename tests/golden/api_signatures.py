#!/usr/bin/env python3
"""The call signatures of a ``guided_diffusion`` package, as JSON-able data.

``dump(gd)`` lists every public function, class and method of the package ``gd``'s
modules, with its parameters (name, kind, default). tests/golden/api_signatures.json
was recorded from the original (PyPI guided-diffusion-sdk 1.0.0) with

    PYTHONPATH=path/to/guided_diffusion_sdk-1.0.0 python tests/golden/api_signatures.py tests/golden/api_signatures.json

and tests/test_api_surface.py checks that code calling the original's signatures
binds the same way against ours.
"""

import importlib
import inspect
import json
import sys

MODULES = (
    "dist_util", "fp16_util", "gaussian_diffusion", "image_datasets", "logger", "losses",
    "nn", "resample", "respace", "script_util", "train_util", "unet",
)


def _parameters(func):
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    params = []
    for p in signature.parameters.values():
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        params.append([p.name, p.kind.name, default])
    return params


def _methods(cls, package):
    """Methods of ``cls``, inherited ones included when they come from ``package``."""
    seen = set()
    for owner in cls.__mro__:
        if not owner.__module__.startswith(package + "."):
            continue
        for name, value in vars(owner).items():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value) and name not in seen:
                seen.add(name)
                yield name, value


def dump(gd):
    """``{"module.name": params}`` for functions and ``"module.Class.method"`` for methods.

    A module's names include those it imports from another module of the package:
    a function moved to a new module and re-exported from its old one is still
    callable under the old name.
    """
    found = {}
    for short in MODULES:
        module = importlib.import_module(f"{gd.__name__}.{short}")
        for name, value in vars(module).items():
            if not str(getattr(value, "__module__", None)).startswith(gd.__name__ + "."):
                continue
            if inspect.isclass(value):
                found[f"{short}.{name}"] = "class"
                for method, func in _methods(value, gd.__name__):
                    found[f"{short}.{name}.{method}"] = _parameters(func)
            elif inspect.isfunction(value):
                found[f"{short}.{name}"] = _parameters(value)
    return found


def main(argv):
    if len(argv) != 2:
        sys.exit(f"usage: {argv[0]} OUT.json")
    import guided_diffusion

    found = dump(guided_diffusion)
    lines = [f" {json.dumps(key)}: {json.dumps(found[key])}" for key in sorted(found)]
    with open(argv[1], "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {argv[1]} from {guided_diffusion.__file__}")


if __name__ == "__main__":
    main(sys.argv)
