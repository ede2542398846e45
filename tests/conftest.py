"""Shared test set-up: every test starts without a torch.distributed process group.

Several modules ask torch.distributed for the rank and world size when a group
exists, so a group left behind by one test (dist_util.setup_dist() creates a
one-process gloo group) would change what the next test sees.
"""

import pytest
import torch.distributed as dist


@pytest.fixture(autouse=True)
def no_process_group_leaks():
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
