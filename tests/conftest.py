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


_SESSION_RAY: dict[str, bool] = {"up": False}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session: 2 CPUs, no dashboard, token auth off (loopback only)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _system_config={"metrics_report_interval_ms": 2000},  # metrics reach the scrape endpoint in seconds
        )
    _SESSION_RAY["up"] = True
    yield ray
    _SESSION_RAY["up"] = False
    ray.shutdown()


@pytest.fixture(autouse=True)
def session_ray_stays_up(request):
    """Fail the test that shuts the session's cluster down: every later test holding ``ray_local`` would
    otherwise meet "Ray has not been started yet", or a cluster Ray Data or Serve auto-started, depending
    on the order the tests happen to run in."""
    yield
    if _SESSION_RAY["up"]:
        import ray

        if not ray.is_initialized():
            pytest.fail(
                f"{request.node.nodeid} shut down the session's Ray cluster: use the ray_local fixture and leave it running"
            )


@pytest.fixture(scope="session")
def tiny_latent_dir(tmp_path_factory, zoo_cache) -> str:
    """The tiny model with a PLUME transition adapter whose experts are non-zero (a fresh adapter is
    the identity, which would hide routing and position bugs), saved as an embedder folder."""
    import torch

    from rime_model import load_embedder
    from rime_model.latent import AdapterConfig

    emb = load_embedder("tiny")
    adapter = emb.attach_latent_adapter(AdapterConfig(hidden_size=emb.dim, default_steps=8), seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return str(emb.save(tmp_path_factory.mktemp("tiny_latent") / "emb"))


@pytest.fixture(scope="session")
def tiny_latent(tiny_latent_dir):
    from rime_model import Embedder

    return Embedder.load(tiny_latent_dir)


@pytest.fixture(autouse=True)
def no_console_handlers_left():
    """``orchestrator.cli.main`` run in-process adds ``[rime]`` console handlers bound to that test's
    captured stdout: remove them after the test, so a later test's log records never reach a closed stream."""
    yield
    from orchestrator.logs import remove_console

    remove_console()
