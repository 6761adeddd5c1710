"""Shared fixtures: a fresh, reproducible random generator per test.

Every test that takes ``rng`` gets a ``numpy.random.Generator`` seeded from
``os.urandom`` (a new seed every run), so the numerics tests see new data each
time. The seed is printed (pytest shows captured output of a failing test) and
added as a section of the failure report. To reproduce a failure, rerun with
the reported seed:

    COMPASS_TEST_SEED=<seed> pytest tests/test_x.py::test_y
"""

from __future__ import annotations

import os

import numpy as np
import pytest

SEED_ENV = "COMPASS_TEST_SEED"


def _new_seed() -> int:
    env = os.environ.get(SEED_ENV)
    if env:
        return int(env, 0)
    return int.from_bytes(os.urandom(8), "little")


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator with a fresh seed (or ``$COMPASS_TEST_SEED``)."""
    seed = _new_seed()
    request.node._compass_rng_seed = seed
    request.node.user_properties.append(("rng_seed", seed))
    print(f"rng seed {seed}: reproduce with {SEED_ENV}={seed}")
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_compass_rng_seed", None)
    if seed is not None and report.failed:
        report.sections.append(("rng seed", f"this test drew seed {seed}; reproduce with {SEED_ENV}={seed} pytest '{item.nodeid}'"))


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op torch thread, restoring the setting afterwards.

    On a busy 2-core machine torch's CPU kernels (notably ``linalg.svd``) can be
    orders of magnitude slower with two spinning OpenMP threads than with one;
    the numerics do not depend on the thread count.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
