"""Placement: turn per-role resource requests into a placement group, or fail fast saying why.

A request the cluster can never satisfy (more CPUs/GPUs than it has) is rejected before any actor
is created; a satisfiable one that does not become ready within ``timeout_s`` (other jobs hold
the resources) fails with the same kind of message instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass

# CPUs every run keeps free beside its actors for Ray Data: Ray 2.60's parquet reader runs a ListFiles
# task that asks a WHOLE CPU, so fractional actors that leave less than this starve the stream.
# Lives here (no torch import) so the trainer and the cluster-profile checks share one value.
DATA_TASK_CPUS = 1.0
# How much of its node_resource each actor asks: a sliver, so the resource only says WHICH node type
# hosts the role (the CPUs and GPUs say how many fit); Ray's resource granularity is 1e-4.
NODE_RESOURCE_UNIT = 0.001
# resources Ray defines itself (a role asks CPUs/GPUs through its own keys, never as a node_resource)
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class PlacementError(RuntimeError):
    """The cluster cannot host the requested roles."""


@dataclass(frozen=True)
class RoleRequest:
    role: str
    count: int
    cpus: float
    gpus: float = 0.0
    node_resource: str = ""  # custom resource that pins the role to a node type ("" = any node)
    section: str = ""  # the config section sizing the role, for messages ("" = the role's name)

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.cpus}
        if self.gpus:
            b["GPU"] = self.gpus
        if self.node_resource:
            b[self.node_resource] = NODE_RESOURCE_UNIT
        return b


def check_fits(requests: list[RoleRequest], available: dict[str, float], reserve_cpus: float = 0.0) -> None:
    """Raise ``PlacementError`` naming the role and the config keys to change if the totals exceed the cluster."""
    for res in ("CPU", "GPU"):
        need = sum(r.count * (r.cpus if res == "CPU" else r.gpus) for r in requests) + (reserve_cpus if res == "CPU" else 0)
        have = float(available.get(res, 0.0))
        if need > have + 1e-9:
            detail = ", ".join(f"{r.role}: {r.count} x {r.cpus if res == 'CPU' else r.gpus:g}" for r in requests)
            extra = f" + {reserve_cpus:g} kept free for data tasks" if res == "CPU" and reserve_cpus else ""
            raise PlacementError(
                f"placement: the roles need {need:g} {res} ({detail}{extra}) but the cluster has {have:g}. "
                f"Lower learners.num_actors / learners.{'cpus' if res == 'CPU' else 'gpus'}_per_actor, "
                "or point cluster.address at a bigger cluster."
            )
    for r in requests:
        if r.node_resource and float(available.get(r.node_resource, 0.0)) + 1e-9 < r.count * NODE_RESOURCE_UNIT:
            key = f"{r.section or r.role}.node_resource"
            custom = sorted(k for k in available if k not in BUILTIN_RESOURCES and not k.startswith("node:"))
            raise PlacementError(
                f"placement: {key}={r.node_resource} pins the {r.role} role to nodes that advertise the resource "
                f"{r.node_resource!r}, and no node of the cluster does (its custom resources: {custom}). Start such nodes "
                f"(a node type's resources in ray_cluster.yaml, `ray start --resources='{{\"{r.node_resource}\": 8}}'`), "
                f'set cluster.autoscaling=true if the autoscaler will add them, or set {key}="" for any node.'
            )


def run_in_bundle(fn, pg, bundle: int, runtime_env: dict | None = None, timeout_s: float | None = None, max_retries: int = 3):
    """``fn()`` as a zero-CPU task inside bundle ``bundle`` of ``pg`` (so on the node, and with the
    runtime_env, of the actor that bundle will host); returns its result. Used to ask a node something
    before the actors that depend on the answer start."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=max_retries)(fn).options(
        runtime_env=runtime_env, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
    )
    return ray.get(task.remote(), timeout=timeout_s)


def reserve(requests: list[RoleRequest], timeout_s: float, reserve_cpus: float = 0.0, check_totals: bool = True):
    """Check totals (not on an autoscaling cluster, whose nodes come with the demand), then create one
    PACK placement group (one bundle per actor) and wait for it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if check_totals:
        check_fits(requests, ray.cluster_resources(), reserve_cpus)
    bundles = [r.bundle() for r in requests for _ in range(r.count)]
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(
            f"placement: {len(bundles)} bundles {bundles} not ready after {timeout_s:g}s; the cluster has "
            f"{ray.available_resources()} free. Free resources, lower the requests, or raise cluster.placement_timeout_s."
        )
    return pg
