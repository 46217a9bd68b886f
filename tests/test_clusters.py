"""Cluster manifests, schema level: every YAML under clusters/ and ray_cluster.yaml parses, has the keys
its consumer needs, and its resources add up to the profile it claims (pods = profile nodes, the RayJob
entrypoint = the profile's config overrides, RayService replicas = the profile's serving role, the
launcher's node types can host the largest profile). Profiles name only keys of orchestrator.config."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml
from rime_cli import set_values

from orchestrator.config import Config, ConfigError, load_config
from orchestrator.profiles import (
    DATA_TASK_CPUS,
    ROLE_KEYS,
    NodeGroup,
    ProfileError,
    Role,
    check_fits,
    load_profile,
    pack,
    profile_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "clusters" / "profiles").glob("*.yaml"))
ALL_YAML = sorted((ROOT / "clusters").rglob("*.yaml")) + [ROOT / "ray_cluster.yaml"]
BASE_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def _k8s_quantity(q) -> float:
    """'16' -> 16, '500m' -> 0.5, '32Gi' -> 32 (GiB)."""
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    if s.endswith("Gi"):
        return float(s[:-2])
    if s.endswith("Mi"):
        return float(s[:-2]) / 1024
    return float(s)


def _config_keys() -> set[str]:
    return set(Config().flat())  # nested sections' keys as model.lora.rank


def _sets(entrypoint: str) -> tuple[str, list[str]]:
    """(config path, --set values) of a `python -m orchestrator.cli train CONFIG --set …` entrypoint."""
    argv = shlex.split(entrypoint.split("&&")[-1])
    i = argv.index("train")
    return argv[i + 1], set_values(argv)


def _pods(cluster_spec: dict) -> list[tuple[str, bool, int, int, dict]]:
    """(group, is_head, min pods, max pods, resource limits) for a KubeRay rayClusterSpec."""
    head = cluster_spec["headGroupSpec"]
    out = [("head", True, 1, 1, head["template"]["spec"]["containers"][0]["resources"]["limits"])]
    for g in cluster_spec.get("workerGroupSpecs") or []:
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        out.append((g["groupName"], False, g.get("minReplicas", g["replicas"]), g.get("maxReplicas", g["replicas"]), lim))
    return out


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses_to_mappings(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_there_are_profiles_for_each_size_and_manifests_for_each_gpu_profile():
    names = {load_profile(p).name for p in PROFILES}
    assert {"cpu-2", "1gpu", "8gpu", "2x8gpu", "aws"} <= names
    for p in PROFILES:
        prof = load_profile(p)
        if prof.total["GPU"]:  # a GPU profile comes with the KubeRay manifests or the launcher YAML it describes
            assert set(prof.kuberay) == {"rayjob", "rayservice"} or (ROOT / prof.launcher).is_file(), p.name
            assert all((ROOT / v).is_file() for v in prof.kuberay.values()), prof.kuberay


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_maps_roles_onto_config_keys_and_fits_its_nodes(path):
    prof = load_profile(path)
    sets = profile_overrides(prof)
    keys = [s.split("=", 1)[0] for s in sets]
    unknown = sorted(set(keys) - _config_keys())
    assert not unknown, f"{path.name} names keys orchestrator/config.py does not have: {unknown}"
    cfg = load_config(BASE_CONFIG, sets)  # types and value checks too
    assert "refine-rl" in cfg.run.stages  # the base config runs every role the profile sizes
    # every role of a run (CMA learners; Refine-RL rollout workers and reward actors) is sized by the profile
    assert set(prof.roles) == set(ROLE_KEYS), path.name
    lr, ro, rw = prof.roles["learners"], prof.roles["rollout_workers"], prof.roles["reward_actors"]
    assert (cfg.learners.num_actors, cfg.learners.cpus_per_actor, cfg.learners.gpus_per_actor) == (lr.count, lr.cpus, lr.gpus)
    assert (cfg.rollout.num_actors, cfg.rollout.cpus_per_actor, cfg.rollout.gpus_per_actor) == (ro.count, ro.cpus, ro.gpus)
    assert (cfg.reward.num_actors, cfg.reward.cpus_per_actor, cfg.reward.gpus_per_actor) == (rw.count, rw.cpus, rw.gpus)
    assert (cfg.learners.node_resource, cfg.rollout.node_resource, cfg.reward.node_resource) == (
        lr.node_resource,
        ro.node_resource,
        rw.node_resource,
    )
    assert cfg.rollout.backend == ro.extra["backend"] == ("vllm" if prof.total["GPU"] else "hf"), path.name
    assert cfg.cluster.address == "auto"
    # resource arithmetic: totals (every role + the head's reserve) within the cluster ...
    for res, attr in (("CPU", "cpus"), ("GPU", "gpus")):
        need = sum(r.count * getattr(r, attr) for r in prof.roles.values()) + (prof.driver_cpus if res == "CPU" else 0)
        assert need <= prof.total[res] + 1e-9, (path.name, res, need, prof.total[res])
    # ... and per node: recount what the packing put on each node (learners, rollout workers, reward actors)
    placed = check_fits(prof)
    counts = {name: sum(a.startswith(f"{name}[") for actors in placed.values() for a in actors) for name in prof.roles}
    assert counts == {name: r.count for name, r in prof.roles.items()}, (path.name, counts)
    capacity = {f"{g.name}[{i}]": g for g in prof.nodes for i in range(g.count)}
    assert set(placed) == set(capacity)
    for node, actors in placed.items():
        g = capacity[node]
        roles_here = [prof.roles[a.split("[")[0]] for a in actors]
        cpus = sum(r.cpus for r in roles_here) + (prof.driver_cpus if g.head else 0)
        gpus = sum(r.gpus for r in roles_here)
        assert cpus <= g.cpus + 1e-9 and gpus <= g.gpus + 1e-9, (path.name, node, actors, cpus, gpus)
        assert all(not r.node_resource or g.resources.get(r.node_resource, 0) > 0 for r in roles_here), (path.name, node)
        if g.head:  # Ray Data's parquet ListFiles task asks a whole CPU: the head keeps at least that free
            assert g.cpus - sum(r.cpus for r in roles_here) >= DATA_TASK_CPUS - 1e-9, (path.name, node, actors)
    if prof.serving:
        assert prof.serving.min_replicas <= prof.serving.max_replicas
        biggest = max(n.gpus for n in prof.nodes)
        assert prof.serving.gpus <= biggest and prof.serving.cpus <= max(n.cpus for n in prof.nodes)


def test_profiles_reserve_what_the_trainer_keeps_free_for_ray_data():
    from orchestrator.learner_group import DATA_TASK_CPUS as trainer_reserve

    assert trainer_reserve == DATA_TASK_CPUS  # submit.py mirrors it to stay torch-free
    for p in PROFILES:
        assert load_profile(p).driver_cpus >= trainer_reserve, p.name


def test_profile_keys_unknown_to_the_config_fail_loudly(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "bad",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 4}],
                "roles": {"learners": {"count": 1, "cpus": 1}},
                "overrides": {"learners.zero_stag": 1},
            }
        )
    )
    with pytest.raises(ConfigError, match=r"learners\.zero_stag: unknown key"):
        load_config(BASE_CONFIG, profile_overrides(load_profile(p)))


@pytest.mark.parametrize(
    "raw, match",
    [
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2}],
                "roles": {"learners": {"count": 2, "cpus": 1}},
            },
            r"roles\.learners: actor 1 \(1 CPU, 0 GPU\) fits on no node; free after the larger actors: h\[0\]: 0 CPU",
        ),
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2}],
                "driver": {"cpus": 0.5},
                "roles": {"learners": {"count": 1, "cpus": 1}},
            },
            r"driver\.cpus: 0.5 is less than the 1 CPU a run keeps free for Ray Data",
        ),
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2}],
                "roles": {"learners": {"count": 1, "cpus": 0.5}, "rollout_workers": {"count": 2, "cpus": 0.3, "backend": "hf"}},
            },
            r"roles\.rollout_workers: actor 1 \(0.3 CPU, 0 GPU\) fits on no node; free after the larger actors: h\[0\]: 0.2 CPU",
        ),
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2}],
                "roles": {"learners": {"count": 1, "cpus": 1}, "critics": {"count": 1, "cpus": 1}},
            },
            r"roles\.critics: unknown role",
        ),
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2}],
                "roles": {"learners": {"count": 1, "cpu": 1}},
            },
            r"roles\.learners\.cpu: unknown key",
        ),
        (
            {"name": "x", "nodes": [{"name": "h", "count": 1, "cpus": 2}], "roles": {"learners": {"count": 1, "cpus": 1}}},
            r"exactly one node group with head: true",
        ),
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2}],
                "roles": {"learners": {"count": 1, "cpus": 1}},
                "overrides": {"learners.num_actors": 4},
            },
            r"overrides\.learners\.num_actors: set by roles",
        ),
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2}],
                "roles": {"learners": {"count": 1, "cpus": "two"}},
            },
            r"roles\.learners\.cpus: expected a number",
        ),
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2, "resources": {"GPU": 1}}],
                "roles": {"learners": {"count": 1, "cpus": 1}},
            },
            r"nodes\[0\]\.resources: custom resources only",
        ),
        (
            {
                "name": "x",
                "nodes": [{"name": "h", "head": True, "count": 1, "cpus": 2, "resources": {"pool": "many"}}],
                "roles": {"learners": {"count": 1, "cpus": 1}},
            },
            r"nodes\[0\]\.resources\.pool: expected a number",
        ),
    ],
)
def test_bad_profiles_are_rejected_naming_the_key(tmp_path, raw, match):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=match):
        load_profile(p)


def test_packing_is_per_node_not_just_totals():
    nodes = [NodeGroup("gpu", 2, cpus=32, gpus=4)]
    # 8 GPUs asked of 8 GPUs in total, but two 3-GPU actors leave 1 + 1 free: the 2-GPU actor fits nowhere
    with pytest.raises(ProfileError, match=r"roles\.b: actor 0 \(1 CPU, 2 GPU\) fits on no node"):
        pack([Role("a", 2, 1, 3), Role("b", 1, 1, 2)], nodes)
    placed = pack([Role("a", 2, 1, 2), Role("b", 2, 1, 2)], nodes)
    assert sorted(len(v) for v in placed.values()) == [2, 2]


def test_packing_puts_a_pinned_role_only_on_the_nodes_of_its_pool():
    nodes = [
        NodeGroup("learn", 1, cpus=32, gpus=8, resources={"learner_pool": 8}),
        NodeGroup("roll", 1, cpus=32, gpus=4, resources={"rollout_pool": 4}),
    ]
    # unpinned, first fit puts all 6 one-GPU rollouts on the 8-GPU node; pinned, 4 fit (its GPUs) and the 5th nowhere
    assert pack([Role("rollout_workers", 6, 1, 1)], nodes) == {
        "learn[0]": [f"rollout_workers[{i}]" for i in range(6)],
        "roll[0]": [],
    }
    placed = pack(
        [
            Role("learners", 2, 1, 1, {"node_resource": "learner_pool"}),
            Role("rollout_workers", 4, 1, 1, {"node_resource": "rollout_pool"}),
        ],
        nodes,
    )
    assert placed == {"learn[0]": ["learners[0]", "learners[1]"], "roll[0]": [f"rollout_workers[{i}]" for i in range(4)]}
    with pytest.raises(
        ProfileError,
        match=r"roles\.rollout_workers: actor 4 \(1 CPU, 1 GPU, on rollout_pool\) fits on no "
        r"node; free on the nodes with 'rollout_pool' after the larger actors: roll\[0\]: 28 CPU 0 GPU",
    ):
        pack([Role("rollout_workers", 5, 1, 1, {"node_resource": "rollout_pool"})], nodes)
    with pytest.raises(ProfileError, match=r"on critic_pool\) fits on no node; .*: none has it"):
        pack([Role("learners", 1, 1, 0, {"node_resource": "critic_pool"})], nodes)


def test_role_table_covers_the_resource_keys_of_each_role():
    for role, (section, keys) in ROLE_KEYS.items():
        assert {"count", "cpus", "gpus"} <= set(keys), role
        assert all(re.fullmatch(r"[a-z_]+", k) for k in keys.values())
        assert section in ("learners", "rollout", "reward")


# --------------------------------------------------------------------------- KubeRay
def _profiles_with(kind: str):
    return [load_profile(p) for p in PROFILES if kind in load_profile(p).kuberay]


@pytest.mark.parametrize("prof", _profiles_with("rayjob"), ids=lambda p: p.name)
def test_rayjob_pods_and_entrypoint_match_the_profile(prof):
    job = yaml.safe_load((ROOT / prof.kuberay["rayjob"]).read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    for key in ("entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"):
        assert key in spec, key
    import ray

    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    # pods = the profile's node groups, resource for resource
    pods = {name: (head, lo, hi, lim) for name, head, lo, hi, lim in _pods(spec["rayClusterSpec"])}
    assert len(pods) == len(prof.nodes)
    for n in prof.nodes:
        head, lo, hi, lim = pods["head" if n.head else n.name]
        assert head == n.head and lo == hi == n.count, n
        assert _k8s_quantity(lim["cpu"]) == n.cpus and _k8s_quantity(lim["memory"]) == n.memory_gib, n
        assert _k8s_quantity(lim.get("nvidia.com/gpu", 0)) == n.gpus, n
    # entrypoint = `rime train` with exactly the profile's overrides (+ run paths), valid for the config
    cfg_path, sets = _sets(spec["entrypoint"])
    assert "python -m orchestrator.cli train" in spec["entrypoint"]
    assert dict(s.split("=", 1) for s in profile_overrides(prof)).items() <= dict(s.split("=", 1) for s in sets).items()
    cfg = load_config(ROOT / cfg_path, sets)
    assert cfg.cluster.address == "auto" and Path(cfg.run.out_dir).is_absolute() and Path(cfg.data.path).is_absolute()
    # the driver logs to the in-cluster MLflow Service
    env = {e["name"]: e.get("value") for e in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == _mlflow_service_uri()


@pytest.mark.parametrize("prof", _profiles_with("rayservice"), ids=lambda p: p.name)
def test_rayservice_replicas_match_the_serving_role_and_fit_the_pods(prof):
    svc = yaml.safe_load((ROOT / prof.kuberay["rayservice"]).read_text())
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "actors.serve_app:build_app"
    assert "model" in app["args"] and set(app["args"]) <= _embedder_server_params()
    (dep,) = app["deployments"]
    opts, auto = dep["ray_actor_options"], dep["autoscaling_config"]
    sv = prof.serving
    assert (opts["num_cpus"], opts.get("num_gpus", 0)) == (sv.cpus, sv.gpus)
    assert (auto["min_replicas"], auto["max_replicas"]) == (sv.min_replicas, sv.max_replicas)
    cluster = svc["spec"]["rayClusterConfig"]
    head_cpus = cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus")

    def replicas_per_pod(lim, head):
        cpus = float(head_cpus) if head and head_cpus is not None else _k8s_quantity(lim["cpu"])
        gpus = _k8s_quantity(lim.get("nvidia.com/gpu", 0))
        fit = int(cpus // sv.cpus) if sv.cpus else 10**6
        return min(fit, int(gpus // sv.gpus)) if sv.gpus else fit

    pods = _pods(cluster)
    at_max = sum(hi * replicas_per_pod(lim, head) for _, head, _, hi, lim in pods)
    at_min = sum(lo * replicas_per_pod(lim, head) for _, head, lo, _, lim in pods)
    assert at_max >= sv.max_replicas, f"{prof.name}: pods host {at_max} replicas at most, serving wants {sv.max_replicas}"
    assert at_min >= sv.min_replicas
    if any(hi > lo for _, _, lo, hi, _ in pods):
        assert cluster.get("enableInTreeAutoscaling") is True  # pods follow the replicas


def _embedder_server_params() -> set[str]:
    tree = ast.parse((ROOT / "actors" / "serve_app.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EmbedderServer")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {a.arg for a in init.args.args[1:] + init.args.kwonlyargs}


def _mlflow_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "clusters" / "kuberay" / "mlflow.yaml").read_text())}


def _mlflow_service_uri() -> str:
    svc = _mlflow_docs()["Service"]
    return f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"


def test_mlflow_manifest_runs_rime_mlflow_server_on_the_service_port():
    from orchestrator.cli import build_parser

    docs = _mlflow_docs()
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(docs)
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["rime", "mlflow-server"]
    args = build_parser().parse_args(c["command"][1:])  # the real CLI accepts it
    svc = docs["Service"]
    assert args.port == svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["containerPort"]
    assert args.host == "0.0.0.0"
    host = _mlflow_service_uri().split("//")[1]
    assert host in args.allowed_hosts.split(","), "the Service DNS name must pass MLflow's Host check"
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= svc["spec"]["selector"].items()
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert args.dir in mounts, "the sqlite store and artifacts must live on the PVC"


# --------------------------------------------------------------------------- ray_cluster.yaml
def _launcher() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_rays_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _launcher()
    validate_config(prepare_config(cfg))
    bad = dict(
        cfg,
        available_node_types={**cfg["available_node_types"], "head": {**cfg["available_node_types"]["head"], "min_workerz": 0}},
    )
    with pytest.raises(Exception, match="min_workerz"):
        validate_config(prepare_config(bad))


def test_ray_cluster_yaml_bounds_setup_and_mlflow_on_the_head():
    cfg = _launcher()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert sum(t["max_workers"] for n, t in types.items() if n != cfg["head_node_type"]) <= cfg["max_workers"]
    for name, t in types.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU")]
    assert len(gpu_types) >= 2  # learner and rollout pools
    # base environment everywhere, installed with the constraints file; vLLM only in its own venv on rollout
    # nodes, the one the GPU profiles' rollout.vllm_python names (and clusters/Dockerfile builds)
    assert any("-c constraints.txt -e ." in c for c in cfg["setup_commands"])
    vllm_cmds = [c for t in types.values() for c in t.get("worker_setup_commands", []) if "vllm" in c.split("#")[0]]
    pythons = {
        load_profile(p).overrides.get("rollout.vllm_python")
        for p in PROFILES
        if any(r.extra.get("backend") == "vllm" for r in load_profile(p).roles.values())
    }
    assert len(pythons) == 1 and None not in pythons
    venv = next(iter(pythons)).removesuffix("/bin/python")
    assert vllm_cmds and all(f"{venv}/bin/pip install" in c for c in vllm_cmds)
    assert f"python -m venv {venv} && {venv}/bin/pip install" in (ROOT / "clusters" / "Dockerfile").read_text()
    assert not any("vllm" in c for c in cfg["setup_commands"] + cfg.get("head_setup_commands", []))
    # MLflow server on the head, and its URI exported before Ray starts (job drivers inherit it)
    head_cmds = cfg["head_start_ray_commands"]
    mlflow_i = next(i for i, c in enumerate(head_cmds) if "rime mlflow-server" in c)
    ray_i = next(i for i, c in enumerate(head_cmds) if "ray start --head" in c)
    assert mlflow_i < ray_i and "MLFLOW_TRACKING_URI=" in head_cmds[ray_i] and "--dashboard-host=0.0.0.0" in head_cmds[ray_i]
    from orchestrator.cli import build_parser

    argv = shlex.split(head_cmds[mlflow_i].split("&&")[-1].split(">")[0])
    args = build_parser().parse_args(argv[argv.index("mlflow-server") :])
    assert args.host == "0.0.0.0" and f":{args.port}" in head_cmds[ray_i]
    for excluded in (".venv", "runs", "data"):
        assert excluded in cfg["rsync_exclude"]


def test_ray_cluster_yaml_turns_on_token_auth_on_every_node():
    """The Jobs API runs whatever code it is sent: every `ray start` has RAY_AUTH_MODE=token, and the token
    the submitting machine generated reaches every node."""
    cfg = _launcher()
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("export RAY_AUTH_MODE=token" in c.split("ray start")[0] for c in starts)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    kuberay = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "clusters" / "kuberay").glob("ray*.yaml"))]
    clusters = [k["spec"].get("rayClusterConfig") or k["spec"].get("rayClusterSpec") for k in kuberay]
    assert clusters and all(c["authOptions"] == {"mode": "token"} for c in clusters)


@pytest.mark.parametrize("name", ["rayservice-1gpu.yaml", "rayservice-8gpu.yaml"])
def test_rayservices_refuse_overload_and_read_api_keys_from_a_secret(name):
    svc = yaml.safe_load((ROOT / "clusters" / "kuberay" / name).read_text())
    (dep,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    assert dep["max_queued_requests"] > 0 and dep["backpressure_config"] == {"status_code": 429, "retry_after_s": 1}
    spec = svc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    serving = pods[-1]["template"]["spec"]["containers"][0]  # the replicas' pods (the head where there are no workers)
    (key,) = [e for e in serving["env"] if e["name"] == "RIME_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "rime-api-keys", "key": "keys", "optional": True}


def _launcher_nodes(cfg: dict) -> list[NodeGroup]:
    """The launcher's node types at max_workers, as profile node groups (custom resources included)."""
    types = cfg["available_node_types"]
    return [
        NodeGroup(
            n,
            1 if n == cfg["head_node_type"] else t["max_workers"],
            t["resources"]["CPU"],
            t["resources"].get("GPU", 0),
            head=n == cfg["head_node_type"],
            resources={k: v for k, v in t["resources"].items() if k not in ("CPU", "GPU")},
        )
        for n, t in types.items()
        if n == cfg["head_node_type"] or t["max_workers"]
    ]


def test_aws_profile_is_ray_cluster_yaml_and_pins_vllm_to_the_nodes_that_install_it():
    """The launcher's pools are real: the aws profile's node groups are ray_cluster.yaml's node types (CPUs,
    GPUs, custom resources), its roles ask their pool's resource, the vLLM rollout pool is advertised only by
    node types that build rollout.vllm_python, and the learners' only by node types without vLLM."""
    cfg = _launcher()
    types = cfg["available_node_types"]
    prof = load_profile(ROOT / "clusters" / "profiles" / "aws.yaml")
    assert prof.launcher == "ray_cluster.yaml"
    for g in prof.nodes:
        t = types[cfg["head_node_type"] if g.head else g.name]
        res = t["resources"]
        assert (res["CPU"], res.get("GPU", 0)) == (g.cpus, g.gpus), g
        assert {k: v for k, v in res.items() if k not in ("CPU", "GPU")} == g.resources, g
        assert g.head or g.count <= t["max_workers"], g
    run = load_config(BASE_CONFIG, profile_overrides(prof))
    assert run.cluster.autoscaling  # a fresh launcher cluster has no worker: demand must scale it up
    venv = run.rollout.vllm_python.removesuffix("/bin/python")

    def builds_vllm(t: dict) -> bool:
        return any(f"{venv}/bin/pip install" in c and "vllm" in c for c in t.get("worker_setup_commands", []))

    pools = {
        "learners": run.learners.node_resource,
        "rollout_workers": run.rollout.node_resource,
        "reward_actors": run.reward.node_resource,
    }
    assert all(pools.values()) and pools["learners"] != pools["rollout_workers"]
    for role, pool in pools.items():
        hosts = [n for n, t in types.items() if t["resources"].get(pool)]
        assert hosts and all(types[n]["max_workers"] for n in hosts), (role, pool)
        if role == "rollout_workers":
            assert run.rollout.backend == "vllm" and all(builds_vllm(types[n]) for n in hosts), hosts
        if role == "learners":
            assert not any(builds_vllm(types[n]) for n in hosts), hosts
    pack(list(prof.roles.values()), _launcher_nodes(cfg), prof.driver_cpus)  # and it fits at max_workers


def test_ray_cluster_yaml_hosts_the_largest_profile_at_max_workers():
    cfg = _launcher()
    types = cfg["available_node_types"]
    nodes = _launcher_nodes(cfg)
    biggest = max((load_profile(p) for p in PROFILES), key=lambda p: p.total["GPU"])
    assert biggest.name == "2x8gpu"
    pack(list(biggest.roles.values()), nodes, biggest.driver_cpus)
    # and each of the profile's GPU node groups has a launcher node type at least as large
    for g in (n for n in biggest.nodes if n.gpus):
        assert any(
            t["resources"]["GPU"] >= g.gpus and t["resources"]["CPU"] >= g.cpus and t["max_workers"] >= g.count
            for t in types.values()
        ), g


def test_vllm_engine_follows_the_learners_precision_and_the_workers_gpu_share():
    """vLLM's own default takes 0.9 of the card; an engine holding 0.3 of a GPU beside the learners (1gpu)
    must take 0.9 x 0.3, and its dtype follows the learners' precision unless rollout.vllm_dtype is set."""
    from orchestrator.config import parse_config
    from orchestrator.rl_actors import vllm_engine_options

    cfg = load_config(BASE_CONFIG, profile_overrides(load_profile(ROOT / "clusters" / "profiles" / "1gpu.yaml")))
    assert vllm_engine_options(cfg) == {
        "max_model_len": 1024,
        "dtype": "bfloat16",
        "enforce_eager": True,
        "gpu_memory_utilization": 0.27,
    }
    own = parse_config(
        {
            "rollout": {
                "backend": "vllm",
                "gpus_per_actor": 1,
                "vllm_gpu_memory_utilization": 0.5,
                "vllm_dtype": "float16",
                "vllm_max_model_len": 4096,
                "vllm_enforce_eager": False,
            }
        }
    )
    assert vllm_engine_options(own) == {
        "max_model_len": 4096,
        "dtype": "float16",
        "enforce_eager": False,
        "gpu_memory_utilization": 0.5,
    }
    assert "gpu_memory_utilization" not in vllm_engine_options(parse_config({"rollout": {"backend": "vllm"}}))  # CPU
    with pytest.raises(ConfigError, match=r"rollout\.vllm_gpu_memory_utilization: must be in \[0, 1\]"):
        parse_config({"rollout": {"vllm_gpu_memory_utilization": 1.5}})
    with pytest.raises(ConfigError, match=r"rollout\.vllm_max_model_len: 10 cannot hold"):
        parse_config({"rollout": {"vllm_max_model_len": 10}})
