"""Refine-RL's non-learner roles: rollout workers and reward actors, placed and fault tolerant.

Both roles get their own placement-group bundles (the reward embedder never borrows the
learners' resources). Fault tolerance is Ray's own: ``max_restarts`` brings a dead actor back
(re-running its constructor) and ``max_task_retries`` re-issues the calls it had in flight, so
a crashed rollout worker costs a restart, not the step. The vLLM backend runs in its own venv
through the actor's ``runtime_env`` (docs/decisions.md §1).
"""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .placement import RoleRequest, reserve

VLLM_VENV = Path(__file__).resolve().parent.parent / ".venv-vllm"


def rl_requests(cfg: Config) -> list[RoleRequest]:
    """The rollout and reward roles' resources as the config states them."""
    ro, rw = cfg.rollout, cfg.reward
    return [RoleRequest("rollout", ro.num_workers, ro.cpus_per_worker, ro.gpus_per_worker),
            RoleRequest("reward", rw.num_actors, rw.cpus_per_actor, rw.gpus_per_actor)]


def rollout_runtime_env(cfg: Config) -> dict:
    """Thread caps for every backend; for vLLM on CPU, the interpreter of ``.venv-vllm``."""
    env = {"env_vars": {"OMP_NUM_THREADS": str(cfg.rollout.torch_threads), "TOKENIZERS_PARALLELISM": "false"}}
    if cfg.rollout.backend == "vllm":
        py = VLLM_VENV / "bin" / "python"
        if cfg.rollout.gpus_per_worker == 0:
            if not py.is_file():
                raise RuntimeError(f"rollout.backend: vllm on CPU needs {py}; create it with `bash scripts/setup_vllm.sh` "
                                   "or set rollout.backend=hf")
            env["py_executable"] = str(py)
        env["env_vars"].update(VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(VLLM_VENV.parent))
    return env


class RLActors:
    """N rollout workers + M reward actors in one placement group; torn down with ``shutdown``."""

    def __init__(self, cfg: Config, model_path: str, data_dir: str, reserve_cpus: float = 0.0):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.rollout import RolloutWorker
        from rewards.anchor_service import AnchorRewardService

        self.cfg = cfg
        requests = rl_requests(cfg)
        self.pg = reserve(requests, cfg.cluster.placement_timeout_s, reserve_cpus=reserve_cpus)
        ro, rw = cfg.rollout, cfg.reward

        def strategy(i: int):
            return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)

        self.rollout = [
            ray.remote(RolloutWorker).options(
                num_cpus=ro.cpus_per_worker, num_gpus=ro.gpus_per_worker, scheduling_strategy=strategy(i),
                max_restarts=ro.max_restarts, max_task_retries=ro.max_restarts, runtime_env=rollout_runtime_env(cfg),
            ).remote(model_path, ro.backend, ro.torch_threads, ro.batch_size)
            for i in range(ro.num_workers)
        ]
        reward_cfg = {k: getattr(rw, k) for k in ("top_k", "neg_temperature", "format_weight", "length_weight", "length_target")}
        threads = max(1, int(rw.cpus_per_actor))  # the CPUs Ray reserved for the actor; a fraction gets one thread
        self.reward = [
            ray.remote(AnchorRewardService).options(
                num_cpus=rw.cpus_per_actor, num_gpus=rw.gpus_per_actor, scheduling_strategy=strategy(ro.num_workers + i),
                max_restarts=rw.max_restarts, max_task_retries=rw.max_restarts,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}},
            ).remote(model_path, data_dir, cfg.data.train_split, reward_cfg, rw.query_encoder, torch_threads=threads)
            for i in range(rw.num_actors)
        ]
        ray.get([a.info.remote() for a in self.rollout] + [a.cache_info.remote() for a in self.reward])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.rollout + self.reward:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
