"""Parity with OpenAI's original guided_diffusion on the golden scenarios.

The scenarios (tests/golden/scenarios.py) replay small deterministic calls of the
public API; tests/golden/public.npz holds what the original returned on the CPU that
recorded it. Float32 rounding depends on the CPU's kernels (oneDNN and MKL pick
others on other CPUs and sum in another order), and a few ill-conditioned keys (x0
predictions at large t, where 1/sqrt(alpha_bar_t) magnifies the last bit) then miss
compare.py's tolerances by single elements, in the original's own code as in ours.
So the original itself (tests/golden/original.py) is replayed here too, beside ours,
and wherever its result on this CPU differs from public.npz, that result is the
reference. Every scenario is compared at compare.py's own tolerances.

Where the original cannot be fetched (offline), a scenario whose public.npz result
ours misses is skipped, saying so: it cannot be told apart from a CPU difference.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from golden import compare, original

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]



class Results:
    """The npz file of one replay, with its keys grouped by scenario."""

    def __init__(self, path):
        self.npz = np.load(path, allow_pickle=False)
        self.groups = compare.group(self.npz.files)

    def compare_to(self, name, ref):
        """compare.py's verdict (ok, message) on scenario ``name`` of these results against ``ref``."""
        return compare.compare_scenario(name, ref.npz, self.npz, ref.groups.get(name, []), self.groups.get(name))

    def ran(self, name):
        keys = self.groups.get(name)
        return bool(keys) and "__error__" not in keys

    def identical(self, name, other):
        """Whether scenario ``name`` holds the same keys and the same values (NaNs included) in both."""
        keys = self.groups.get(name, [])
        if sorted(keys) != sorted(other.groups.get(name, [])):
            return False
        for key in keys:
            a, b = self.npz[f"{name}/{key}"], other.npz[f"{name}/{key}"]
            if a.shape != b.shape or a.dtype != b.dtype:
                return False
            if not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
                return False
        return True


PUBLIC = Results(GOLDEN / "public.npz")
NAMES = compare.scenario_list(PUBLIC.npz, PUBLIC.groups)


def _replay_ours(out):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OPENAI_LOGDIR", None)
    proc = subprocess.run(
        [sys.executable, str(GOLDEN / "scenarios.py"), "--set", "public", "-q", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if not out.exists():
        pytest.fail(f"scenario replay wrote nothing:\n{proc.stderr[-4000:]}")
    return Results(out)


def _wait_for_original(proc, out):
    """The original's results from its replay ``proc``, or (None, why not)."""
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        return None, "the original's replay took longer than 900 s"
    if not out.exists():
        return None, f"the original's replay wrote nothing (see {out.with_suffix('.log')})"
    return Results(out), None


@pytest.fixture(scope="session")
def replays(tmp_path_factory):
    """Ours and (where it can be fetched) the original, replayed side by side on this machine.

    Returns (ours, the original's results or None, why they are missing or None).
    """
    folder = tmp_path_factory.mktemp("golden")
    try:
        package = original.fetch()
    except original.Unavailable as err:
        return _replay_ours(folder / "ours.npz"), None, str(err)
    theirs = original.replay(package, folder / "original.npz")
    try:
        ours = _replay_ours(folder / "ours.npz")
        return (ours, *_wait_for_original(theirs, folder / "original.npz"))
    finally:
        if theirs.poll() is None:  # ours failed or the original hangs
            theirs.kill()
            theirs.wait()


def reference_for(name, theirs, stored=PUBLIC):
    """The stored results (public.npz), or the original's results on this CPU (``theirs``)
    where they differ from the stored ones and the original ran the scenario without error."""
    if theirs is not None and theirs.ran(name) and not theirs.identical(name, stored):
        return theirs, "the original's result on this CPU"
    return stored, "public.npz"


@pytest.mark.parametrize("name", NAMES)
def test_scenario_matches_original(name, replays):
    ours, theirs, why_missing = replays
    ref, ref_name = reference_for(name, theirs)
    ok, message = ours.compare_to(name, ref)
    if compare.is_soft(name):
        if not ok:
            pytest.skip(f"soft scenario (reported, not counted): {message}")
        return
    if not ok and theirs is None:
        pytest.skip(f"{name} misses public.npz ({message}), and the original could not be run on this CPU to "
                    f"tell a CPU rounding difference from a real one: {why_missing}")
    assert ok, f"{name} (against {ref_name}): {message}"


def _results(tmp_path, filename, arrays):
    np.savez(tmp_path / filename, **arrays)
    return Results(tmp_path / filename)


def test_the_reference_is_the_original_on_this_cpu_only_where_it_ran_and_differs(tmp_path):
    stored = _results(tmp_path, "stored.npz", {"a/x": np.float32([1, 2]), "b/x": np.float32([1, 2]),
                                               "c/x": np.float32([1, 2])})
    here = _results(tmp_path, "here.npz", {"a/x": np.float32([1, 2]), "b/x": np.float32([1, 2.0000002]),
                                           "c/__error__": np.str_("AttributeError: np.int")})
    assert reference_for("a", here, stored)[0] is stored  # the same bits
    assert reference_for("b", here, stored)[0] is here  # this CPU rounds differently
    assert reference_for("c", here, stored)[0] is stored  # the original failed here
    assert reference_for("b", None, stored)[0] is stored  # offline
