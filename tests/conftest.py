"""Shared fixtures: one tiny embedder per test session, built into a private zoo cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("rime_cache"))
    os.environ["RIME_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny(zoo_cache):
    from rime_model import load_embedder

    return load_embedder("tiny")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session: 2 CPUs, no dashboard, token auth off (loopback only)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
