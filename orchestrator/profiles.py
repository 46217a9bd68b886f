"""Per-size cluster profiles (``clusters/profiles/*.yaml``): node groups, and the roles (learners, rollout
workers, reward actors) as counts and CPUs/GPUs, packed onto the nodes to check they fit, and turned into
the config's ``--set`` overrides (``rime profile``, ``rime submit --profile``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .placement import BUILTIN_RESOURCES, DATA_TASK_CPUS, NODE_RESOURCE_UNIT  # noqa: F401  (DATA_TASK_CPUS: re-export)


class ProfileError(ValueError):
    """A malformed profile or one whose roles cannot fit on its nodes; the message names file and key."""


# role in a profile -> (config section, {profile field: config key}); every role section sizes its actors
# with the same keys. load_config checks the values (e.g. rollout.backend hf|vllm), and a key the config
# lacks fails loudly like any bad --set.
_SIZE_KEYS = {"count": "num_actors", "cpus": "cpus_per_actor", "gpus": "gpus_per_actor", "node_resource": "node_resource"}
ROLE_KEYS: dict[str, tuple[str, dict[str, str]]] = {
    "learners": ("learners", _SIZE_KEYS),
    "rollout_workers": ("rollout", {**_SIZE_KEYS, "backend": "backend"}),
    "reward_actors": ("reward", _SIZE_KEYS),
}


@dataclass(frozen=True)
class NodeGroup:
    name: str
    count: int
    cpus: float
    gpus: float = 0.0
    memory_gib: float = 0.0
    head: bool = False
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each node advertises


@dataclass(frozen=True)
class Role:
    name: str
    count: int
    cpus: float
    gpus: float = 0.0
    extra: dict = field(default_factory=dict)  # e.g. rollout backend, node_resource

    @property
    def node_resource(self) -> str:
        return str(self.extra.get("node_resource") or "")


@dataclass(frozen=True)
class Serving:
    cpus: float
    gpus: float
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    description: str
    nodes: tuple[NodeGroup, ...]
    driver_cpus: float
    roles: dict[str, Role]
    serving: Serving | None
    overrides: dict[str, Any]
    kuberay: dict[str, str]
    launcher: str = ""  # a Ray cluster launcher YAML whose node types are this profile's nodes

    @property
    def total(self) -> dict[str, float]:
        return {"CPU": sum(n.count * n.cpus for n in self.nodes), "GPU": sum(n.count * n.gpus for n in self.nodes)}


def _num(d: dict, key: str, where: str, *, integer: bool = False, default: Any = None, minimum: float = 0) -> Any:
    if key not in d:
        if default is None:
            raise ProfileError(f"{where}.{key}: required")
        return default
    v = d[key]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise ProfileError(f"{where}.{key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    if v < minimum:
        raise ProfileError(f"{where}.{key}: must be >= {minimum}, got {v}")
    return v


def _mapping(d: Any, where: str) -> dict:
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(d).__name__}")
    return d


def _only(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ProfileError(f"{where}.{unknown[0]}: unknown key; valid: {', '.join(sorted(allowed))}")


def load_profile(path: str | Path) -> Profile:
    """Parse and check a profile: required keys, types, role names, and that the roles fit its nodes."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile: file not found: {p}")
    raw = _mapping(yaml.safe_load(p.read_text()) or {}, f"{p.name}")
    w = p.name
    _only(raw, {"name", "description", "nodes", "driver", "roles", "serving", "overrides", "kuberay", "launcher"}, w)
    for k in ("name", "nodes", "roles"):
        if k not in raw:
            raise ProfileError(f"{w}: {k}: required")
    if not isinstance(raw["nodes"], list) or not raw["nodes"]:
        raise ProfileError(f"{w}: nodes: expected a non-empty list of node groups")
    nodes = []
    for i, n in enumerate(raw["nodes"]):
        where = f"{w}: nodes[{i}]"
        n = _mapping(n, where)
        _only(n, {"name", "count", "cpus", "gpus", "memory_gib", "head", "resources"}, where)
        res = _mapping(n.get("resources") or {}, f"{where}.resources")
        custom = {str(k): _num(res, k, f"{where}.resources") for k in res}
        if set(custom) & set(BUILTIN_RESOURCES):
            raise ProfileError(f"{where}.resources: custom resources only; give CPUs and GPUs as cpus/gpus")
        nodes.append(
            NodeGroup(
                str(n.get("name", f"group{i}")),
                _num(n, "count", where, integer=True, minimum=1),
                _num(n, "cpus", where),
                _num(n, "gpus", where, default=0),
                _num(n, "memory_gib", where, default=0),
                bool(n.get("head", False)),
                custom,
            )
        )
    heads = [n for n in nodes if n.head]
    if len(heads) != 1 or heads[0].count != 1:
        raise ProfileError(f"{w}: nodes: exactly one node group with head: true and count: 1 is required")
    roles = {}
    for name, r in _mapping(raw["roles"], f"{w}: roles").items():
        where = f"{w}: roles.{name}"
        if name not in ROLE_KEYS:
            raise ProfileError(f"{where}: unknown role; valid: {', '.join(ROLE_KEYS)}")
        r = _mapping(r, where)
        _only(r, set(ROLE_KEYS[name][1]), where)
        extra = {k: v for k, v in r.items() if k not in ("count", "cpus", "gpus")}
        roles[name] = Role(
            name,
            _num(r, "count", where, integer=True, minimum=1),
            _num(r, "cpus", where),
            _num(r, "gpus", where, default=0),
            extra,
        )
    if "learners" not in roles:
        raise ProfileError(f"{w}: roles.learners: required (every stage trains on learners)")
    serving = None
    if raw.get("serving") is not None:
        s = _mapping(raw["serving"], f"{w}: serving")
        _only(s, {"cpus", "gpus", "min_replicas", "max_replicas"}, f"{w}: serving")
        serving = Serving(
            _num(s, "cpus", f"{w}: serving"),
            _num(s, "gpus", f"{w}: serving", default=0),
            _num(s, "min_replicas", f"{w}: serving", integer=True, minimum=0),
            _num(s, "max_replicas", f"{w}: serving", integer=True, minimum=1),
        )
        if serving.min_replicas > serving.max_replicas:
            raise ProfileError(f"{w}: serving.min_replicas: {serving.min_replicas} > max_replicas {serving.max_replicas}")
    overrides = _mapping(raw.get("overrides") or {}, f"{w}: overrides")
    for k in overrides:
        if not isinstance(k, str) or k.count(".") != 1:
            raise ProfileError(f"{w}: overrides.{k}: use section.key (a key of orchestrator/config.py)")
        if any(k == f"{sec}.{key}" for sec, keys in ROLE_KEYS.values() for key in keys.values()):
            raise ProfileError(f"{w}: overrides.{k}: set by roles; change the role instead")
    driver = _mapping(raw.get("driver") or {}, f"{w}: driver")
    _only(driver, {"cpus"}, f"{w}: driver")
    driver_cpus = _num(driver, "cpus", f"{w}: driver", default=DATA_TASK_CPUS)
    if driver_cpus + 1e-9 < DATA_TASK_CPUS:
        raise ProfileError(
            f"{w}: driver.cpus: {driver_cpus:g} is less than the {DATA_TASK_CPUS:g} CPU a run keeps free for "
            "Ray Data (its parquet ListFiles task asks a whole CPU; orchestrator/placement.py "
            "DATA_TASK_CPUS): the job would hang reading data; shrink the roles instead"
        )
    prof = Profile(
        str(raw["name"]),
        str(p),
        str(raw.get("description", "")),
        tuple(nodes),
        driver_cpus,
        roles,
        serving,
        dict(overrides),
        {str(k): str(v) for k, v in _mapping(raw.get("kuberay") or {}, f"{w}: kuberay").items()},
        str(raw.get("launcher") or ""),
    )
    check_fits(prof)
    return prof


def pack(roles: list[Role], nodes: list[NodeGroup], driver_cpus: float = 0.0) -> dict[str, list[str]]:
    """First-fit-decreasing placement of every actor on the nodes (the driver and Ray Data tasks keep
    ``driver_cpus`` on the head; a role with a node_resource goes only where that resource is left).
    Returns node -> roles placed; raises ProfileError when one cannot fit."""
    free = []
    for g in nodes:
        for i in range(g.count):
            free.append(
                {
                    "name": f"{g.name}[{i}]",
                    "CPU": g.cpus - (driver_cpus if g.head else 0),
                    "GPU": g.gpus,
                    "custom": dict(g.resources),
                    "roles": [],
                }
            )
    if any(n["CPU"] < -1e-9 for n in free):
        raise ProfileError(f"driver.cpus: {driver_cpus:g} CPU does not fit on the head node")
    actors = sorted(((r, i) for r in roles for i in range(r.count)), key=lambda a: (-a[0].gpus, -a[0].cpus))
    for role, i in actors:
        pool = role.node_resource
        for n in free:
            if (
                n["CPU"] + 1e-9 >= role.cpus
                and n["GPU"] + 1e-9 >= role.gpus
                and (not pool or n["custom"].get(pool, 0) + 1e-9 >= NODE_RESOURCE_UNIT)
            ):
                n["CPU"] -= role.cpus
                n["GPU"] -= role.gpus
                if pool:
                    n["custom"][pool] -= NODE_RESOURCE_UNIT
                n["roles"].append(f"{role.name}[{i}]")
                break
        else:
            left = ", ".join(
                f"{n['name']}: {n['CPU']:g} CPU {n['GPU']:g} GPU"
                for n in free
                if not pool or n["custom"].get(pool, 0) + 1e-9 >= NODE_RESOURCE_UNIT
            )
            where = f"free on the nodes with {pool!r} after the larger actors" if pool else "free after the larger actors"
            raise ProfileError(
                f"roles.{role.name}: actor {i} ({role.cpus:g} CPU, {role.gpus:g} GPU"
                f"{', on ' + pool if pool else ''}) fits on no node; {where}: {left or 'none has it'}"
            )
    return {n["name"]: n["roles"] for n in free}


def check_fits(profile: Profile) -> dict[str, list[str]]:
    try:
        return pack(list(profile.roles.values()), list(profile.nodes), profile.driver_cpus)
    except ProfileError as e:
        raise ProfileError(f"{Path(profile.path).name}: {e}") from None


def profile_overrides(profile: Profile) -> list[str]:
    """The profile as ``section.key=value`` overrides of the run config (roles first, then ``overrides``)."""
    out = ["cluster.address=auto"]
    for name, role in profile.roles.items():
        section, keys = ROLE_KEYS[name]
        vals = {"count": role.count, "cpus": role.cpus, "gpus": role.gpus, **role.extra}
        out += [f"{section}.{keys[k]}={_yaml_scalar(v)}" for k, v in vals.items()]
    out += [f"{k}={_yaml_scalar(v)}" for k, v in profile.overrides.items()]
    return out


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
