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
