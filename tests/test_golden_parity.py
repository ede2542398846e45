"""Parity with OpenAI's original guided_diffusion on the golden scenarios.

The scenarios (tests/golden/scenarios.py) replay small deterministic calls of the
public API; tests/golden/public.npz holds what the original returned.  The whole
set is replayed once per session in a subprocess (about half a minute on two
cores), then every scenario is compared at the tolerances of compare.py.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]


def _load_compare():
    spec = importlib.util.spec_from_file_location("golden_compare", GOLDEN / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load_compare()
REF = np.load(GOLDEN / "public.npz", allow_pickle=False)
REF_GROUPS = compare.group(REF.files)
NAMES = compare.scenario_list(REF, REF_GROUPS)


@pytest.fixture(scope="session")
def replayed(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "got.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OPENAI_LOGDIR", None)
    proc = subprocess.run(
        [sys.executable, str(GOLDEN / "scenarios.py"), "--set", "public", "-q", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if not out.exists():
        pytest.fail(f"scenario replay wrote nothing:\n{proc.stderr[-4000:]}")
    got = np.load(out, allow_pickle=False)
    return got, compare.group(got.files), proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_scenario_matches_original(name, replayed):
    got, got_groups, log = replayed
    ok, message = compare.compare_scenario(name, REF, got, REF_GROUPS.get(name, []), got_groups.get(name))
    if compare.is_soft(name):
        if not ok:
            pytest.skip(f"soft scenario (reported, not counted): {message}")
        return
    assert ok, f"{name}: {message}"
