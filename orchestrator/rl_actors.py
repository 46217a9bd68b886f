"""Refine-RL's non-learner roles: rollout workers and reward actors, placed and fault tolerant.

Both roles get their own placement-group bundles (the reward embedder never borrows the
learners' resources). Fault tolerance is Ray's own: ``max_restarts`` brings a dead actor back
(re-running its constructor) and ``max_task_retries`` re-issues the calls it had in flight, so
a crashed rollout worker costs a restart, not the step. The vLLM backend runs in its own venv
through the actor's ``runtime_env`` (docs/decisions.md §1).
"""

from __future__ import annotations

from pathlib import Path

from rime_model.choices import PRECISION_DTYPE

from .config import Config
from .placement import RoleRequest, reserve, run_in_bundle

VLLM_VENV = Path(__file__).resolve().parent.parent / ".venv-vllm"


def rl_requests(cfg: Config) -> list[RoleRequest]:
    """The rollout and reward roles' resources as the config states them."""
    ro, rw = cfg.rollout, cfg.reward
    return [
        RoleRequest("rollout", ro.num_actors, ro.cpus_per_actor, ro.gpus_per_actor, ro.node_resource, "rollout"),
        RoleRequest("reward", rw.num_actors, rw.cpus_per_actor, rw.gpus_per_actor, rw.node_resource, "reward"),
    ]


def rollout_runtime_env(cfg: Config) -> dict:
    """Thread caps for every backend; for vLLM, the interpreter of the venv that has it (vLLM and verl
    pin incompatible transformers, so vLLM never lives in the base environment: docs/decisions.md §1)."""
    env = {"env_vars": {"OMP_NUM_THREADS": str(cfg.rollout.torch_threads), "TOKENIZERS_PARALLELISM": "false"}}
    if cfg.rollout.backend == "vllm":
        env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cfg.rollout.vllm_python:  # a path on the rollout nodes: probed there (check_vllm_python)
            env["py_executable"] = cfg.rollout.vllm_python
        else:
            py = VLLM_VENV / "bin" / "python"
            if not py.is_file():
                raise RuntimeError(
                    f"rollout.vllm_python: empty, and this checkout has no {py}; create it with "
                    "`bash scripts/setup_vllm.sh` (vLLM for CPU), set rollout.vllm_python to the Python "
                    "of a venv with vLLM on the rollout nodes, or set rollout.backend=hf"
                )
            env["py_executable"] = str(py)
            env["env_vars"]["PYTHONPATH"] = str(VLLM_VENV.parent)  # this checkout's rime, for that venv
    return env


def vllm_engine_options(cfg: Config) -> dict:
    """The vLLM engine's settings from the config: dtype follows the learners unless set, and the
    memory share follows the worker's GPU fraction (vLLM's own default, 0.9 of the card, would not
    leave room for the roles that share it)."""
    ro = cfg.rollout
    opts = {
        "max_model_len": ro.vllm_max_model_len,
        "dtype": ro.vllm_dtype or PRECISION_DTYPE[cfg.learners.precision],
        "enforce_eager": ro.vllm_enforce_eager,
    }
    if ro.gpus_per_actor > 0:
        opts["gpu_memory_utilization"] = ro.vllm_gpu_memory_utilization or round(0.9 * min(ro.gpus_per_actor, 1.0), 3)
    return opts


def check_vllm_python(cfg: Config, pg, bundle: int) -> str:
    """Import vLLM with the rollout workers' runtime_env inside their first bundle (so on their node)
    and return its version: a wrong rollout.vllm_python fails here in seconds, naming the key, instead
    of as actors that die in their constructor and are restarted max_restarts times."""

    def probe() -> str:
        import vllm

        return vllm.__version__

    env = rollout_runtime_env(cfg)
    try:
        return run_in_bundle(probe, pg, bundle, runtime_env=env, timeout_s=600, max_retries=0)
    except Exception as e:  # noqa: BLE001 - a missing interpreter and a failed import surface differently
        reason = str(getattr(e, "cause", None) or e).strip().splitlines()[-1][:300]
        raise RuntimeError(
            f"rollout.vllm_python: {env['py_executable']} cannot import vllm on the rollout node "
            f"({reason}); point it at the Python of a venv with vLLM and ray on every rollout node "
            "(ray_cluster.yaml and clusters/Dockerfile build /opt/rime-vllm), or set rollout.backend=hf"
        ) from None


class RLActors:
    """N rollout workers + M reward actors in one placement group; torn down with ``shutdown``."""

    def __init__(self, cfg: Config, model_path: str, candidates: list[dict], reserve_cpus: float = 0.0):
        """``candidates``: the training stream's checked candidates; one object-store copy serves every
        reward actor and their restarts (held here for the actors' lifetime)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.rollout import RolloutWorker
        from rewards.anchor_service import AnchorRewardService

        self.cfg = cfg
        requests = rl_requests(cfg)
        self.candidates_ref = ray.put(candidates)
        self.pg = reserve(
            requests, cfg.cluster.placement_timeout_s, reserve_cpus=reserve_cpus, check_totals=not cfg.cluster.autoscaling
        )
        ro, rw = cfg.rollout, cfg.reward

        def strategy(i: int):
            return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)

        if ro.backend == "vllm":
            check_vllm_python(cfg, self.pg, 0)
        self.rollout = [
            ray.remote(RolloutWorker)
            .options(
                num_cpus=ro.cpus_per_actor,
                num_gpus=ro.gpus_per_actor,
                scheduling_strategy=strategy(i),
                max_restarts=ro.max_restarts,
                max_task_retries=ro.max_restarts,
                runtime_env=rollout_runtime_env(cfg),
            )
            .remote(
                model_path,
                ro.backend,
                ro.torch_threads,
                ro.batch_size,
                vllm_engine_options(cfg) if ro.backend == "vllm" else None,
                cfg.model.lora.model_dump() if ro.weight_sync == "lora_adapter" else None,
                cfg.model.dtype,
            )
            for i in range(ro.num_actors)
        ]
        reward_cfg = {
            k: getattr(rw, k) for k in ("top_k", "neg_temperature", "format_weight", "length_weight", "length_target", "outcome")
        }
        threads = max(1, int(rw.cpus_per_actor))  # the CPUs Ray reserved for the actor; a fraction gets one thread
        self.reward = [
            ray.remote(AnchorRewardService)
            .options(
                num_cpus=rw.cpus_per_actor,
                num_gpus=rw.gpus_per_actor,
                scheduling_strategy=strategy(ro.num_actors + i),
                max_restarts=rw.max_restarts,
                max_task_retries=rw.max_restarts,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}},
            )
            .remote(model_path, self.candidates_ref, reward_cfg, rw.query_encoder, torch_threads=threads, dtype=cfg.model.dtype)
            for i in range(rw.num_actors)
        ]
        ray.get([a.info.remote() for a in self.rollout] + [a.cache_info.remote() for a in self.reward])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.rollout + self.reward:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
        self.candidates_ref = None  # the last reference: the object store frees the candidate set
