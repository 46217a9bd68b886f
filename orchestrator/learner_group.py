"""The driver's handle on K learner actors: create them in a placement group, fan calls out, gather."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from actors.learner import Learner

from .config import Config
from .placement import DATA_TASK_CPUS, RoleRequest, reserve, run_in_bundle


def learner_request(cfg: Config) -> RoleRequest:
    """The learner role's resources as the config states them."""
    lc = cfg.learners
    return RoleRequest("learner", lc.num_actors, lc.cpus_per_actor, lc.gpus_per_actor, lc.node_resource, "learners")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # every interface: other nodes connect to it
        return s.getsockname()[1]


def rendezvous(pg) -> tuple[str, int]:
    """(IP, free port) on the node of the placement group's bundle 0, where rank 0 will run and host
    torch.distributed's store. The driver's own address is wrong on a multi-node cluster (PACK may
    put rank 0 elsewhere; a Ray Client driver is not even in the cluster): the other ranks would wait
    out the process-group timeout. Found by a zero-CPU task in that bundle, as verl and OpenRLHF ask
    their rank-0 actor."""

    def probe() -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    return run_in_bundle(probe, pg, 0)


class LearnerGroup:
    """K ``Learner`` actors forming one data-parallel group (rank 0 is the reporting rank)."""

    def __init__(
        self, cfg: Config, model_path: str, stage_cfg: dict, reserve_cpus: float = DATA_TASK_CPUS, **learner_options: Any
    ):
        """``learner_options``: what the run's stages ask of every learner at construction
        (``Stage.learner_options``, e.g. PLUME's ``latent_adapter``)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lc = cfg.learners
        self.size = lc.num_actors
        self.pg = reserve(
            [learner_request(cfg)],
            cfg.cluster.placement_timeout_s,
            reserve_cpus=reserve_cpus,
            check_totals=not cfg.cluster.autoscaling,
        )
        remote = ray.remote(Learner)
        node_ip, port = rendezvous(self.pg)
        addr = "127.0.0.1" if not cfg.cluster.address else node_ip
        self.actors = [
            remote.options(
                num_cpus=lc.cpus_per_actor,
                num_gpus=lc.gpus_per_actor,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(lc.torch_threads), "TOKENIZERS_PARALLELISM": "false"}},
            ).remote(
                i,
                lc.num_actors,
                addr,
                port,
                model_path,
                lc.model_dump(),
                stage_cfg,
                cfg.run.seed,
                cfg.model.freeze_vision,
                lora=cfg.model.lora.model_dump() if cfg.model.lora.rank > 0 else None,
                **learner_options,
            )
            for i in range(lc.num_actors)
        ]
        ray.get([a.ping.remote() for a in self.actors])

    def call(self, method: str, *args: Any, per_rank: list[tuple] | None = None, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every rank (same args, or ``per_rank`` arg tuples; same keyword args) and wait for all."""
        import ray

        if per_rank is not None:
            refs = [getattr(a, method).remote(*pa, **kwargs) for a, pa in zip(self.actors, per_rank)]
        else:
            refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return ray.get(refs)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(ray.exceptions.RayError, TimeoutError):  # a dead rank cannot join the barrier: kill anyway
            ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
