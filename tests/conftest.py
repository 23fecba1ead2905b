"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and do not stall when other work shares the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cluster():
    """A running local Slurm cluster (tests/slurm_cluster.py), shared by the Slurm test modules; skipped
    only when Slurm cannot be installed here, any other problem fails."""
    import slurm_cluster

    try:
        running, started_now = slurm_cluster.start()
    except slurm_cluster.SlurmUnavailable as err:
        pytest.skip(str(err))
    yield running
    if started_now:
        slurm_cluster.stop(running.state_dir)
