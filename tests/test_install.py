"""The environment the README builds: CPU torch from the pin, no CUDA wheels, verl-compatible stack."""

from __future__ import annotations

from importlib import metadata


def test_no_cuda_wheels_and_pinned_torch():
    import torch

    assert torch.__version__.startswith("2.13.0"), torch.__version__
    names = sorted(d.metadata["Name"].lower() for d in metadata.distributions())
    assert not [n for n in names if n.startswith(("nvidia-", "cuda-", "triton"))]


def test_core_stack_imports_on_cpu():
    import deepspeed  # noqa: F401
    import mlflow  # noqa: F401
    import ray  # noqa: F401
    from verl.trainer.ppo import core_algos

    assert callable(core_algos.compute_grpo_outcome_advantage)
