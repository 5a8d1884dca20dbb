"""The job specs (jobs/) and cluster configs (cluster/) parse and carry what they promise.

KubeRay manifests are checked against the fields its CRDs require (ray.io/v1, from
ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go: a field without
``omitempty`` in its json tag is required), plus this project's rules: one image and one Ray
version everywhere, GPUs on the workers, shared storage as Train's storage_path, the job API
behind a ClusterIP service and token auth from a Secret. The cluster-launcher YAML is validated
against the JSON schema that Ray ships. No cluster is started.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
JOBS, CLUSTER = ROOT / "jobs", ROOT / "cluster"
RAY_VERSION, TORCH_VERSION = "2.60.0", "2.14.1"
AUTH_SECRET = "controlnet-ray-auth"

# --- required fields, by CRD type (json tags without omitempty) -----------------------------
# RayCluster / RayJob objects: apiVersion, kind, metadata.name, spec.
OBJECT_FIELDS = ("apiVersion", "kind", "metadata", "spec")
# RayClusterSpec.headGroupSpec `json:"headGroupSpec"`.
CLUSTER_SPEC_FIELDS = ("headGroupSpec",)
# HeadGroupSpec.rayStartParams `json:"rayStartParams"`, .template `json:"template"`.
HEAD_GROUP_FIELDS = ("rayStartParams", "template")
# WorkerGroupSpec.groupName, .minReplicas, .maxReplicas, .rayStartParams, .template; replicas
# is optional in the CRD (default 0) but required here so the manifest states its size.
WORKER_GROUP_FIELDS = (
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
)
# RayJobSpec: entrypoint, submissionMode, shutdownAfterJobFinishes are optional in the CRD
# (defaults: "", K8sJobMode, false); this project states them. Plus exactly one of
# rayClusterSpec (a cluster per job) or clusterSelector (an existing RayCluster).
RAYJOB_FIELDS = ("entrypoint", "submissionMode", "shutdownAfterJobFinishes")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def yaml_files() -> list[Path]:
    return sorted([*JOBS.glob("*.yaml"), *CLUSTER.glob("*.yaml")])


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kube_objects(kind: str) -> list[tuple[Path, dict]]:
    return [
        (p, d) for p in sorted(CLUSTER.glob("*.yaml")) for d in load_all(p) if d.get("kind") == kind
    ]


def missing(obj: dict, fields: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}.{f}" for f in fields if obj.get(f) in (None, "")]


def check_cluster_spec(spec: dict, where: str) -> list[str]:
    """Required fields of a RayClusterSpec (RayCluster.spec or RayJob.spec.rayClusterSpec)."""
    errors = missing(spec, CLUSTER_SPEC_FIELDS, where)
    head = spec.get("headGroupSpec") or {}
    errors += missing(head, HEAD_GROUP_FIELDS, f"{where}.headGroupSpec")
    containers = pod_spec(head).get("containers") or []
    if not containers or not containers[0].get("image"):
        errors.append(f"{where}.headGroupSpec.template.spec.containers[0].image")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        errors.append(f"{where}.workerGroupSpecs")
    for i, group in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        errors += missing(group, WORKER_GROUP_FIELDS, gw)
        if not all(isinstance(group.get(k), int) for k in ("minReplicas", "maxReplicas")):
            continue
        if not group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]:
            errors.append(f"{gw}: needs minReplicas <= replicas <= maxReplicas")
        for j, c in enumerate(pod_spec(group).get("containers") or []):
            if not c.get("image"):
                errors.append(f"{gw}.template.spec.containers[{j}].image")
    return errors


def check_rayjob(job: dict, where: str) -> list[str]:
    spec = job.get("spec") or {}
    errors = missing(spec, RAYJOB_FIELDS, f"{where}.spec")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        errors.append(f"{where}.spec: exactly one of rayClusterSpec or clusterSelector")
    if spec.get("submissionMode") not in SUBMISSION_MODES:
        errors.append(f"{where}.spec.submissionMode must be one of {SUBMISSION_MODES}")
    if "rayClusterSpec" in spec:
        errors += check_cluster_spec(spec["rayClusterSpec"], f"{where}.spec.rayClusterSpec")
    return errors


def pod_spec(group: dict) -> dict:
    return (group.get("template") or {}).get("spec") or {}


def cluster_specs() -> Iterator[tuple[str, dict]]:
    for path, obj in kube_objects("RayCluster"):
        yield f"{path.name}:RayCluster", obj["spec"]
    for path, obj in kube_objects("RayJob"):
        yield f"{path.name}:RayJob", obj["spec"]["rayClusterSpec"]


def all_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in pod_spec(g)["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- the checker itself must be able to fail ------------------------------------------------


def test_checker_reports_missing_crd_fields():
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}}
    spec = {
        "headGroupSpec": {"template": {"spec": {"containers": [{"name": "h"}]}}},
        "workerGroupSpecs": [{"groupName": "g", "minReplicas": 2, "replicas": 1}],
    }
    errors = check_cluster_spec(spec, "spec")
    assert "spec.headGroupSpec.rayStartParams" in errors
    assert "spec.headGroupSpec.template.spec.containers[0].image" in errors
    assert "spec.workerGroupSpecs[0].maxReplicas" in errors
    assert "spec.workerGroupSpecs[0].template" in errors
    job = {**cluster, "kind": "RayJob", "spec": {"entrypoint": "x", "clusterSelector": {}}}
    job["spec"]["rayClusterSpec"] = spec
    errors = check_rayjob(job, "job")
    assert any("exactly one of" in e for e in errors)
    assert any("submissionMode" in e for e in errors)


# --- every YAML ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.name)
def test_every_yaml_parses(path: Path):
    assert load_all(path), f"{path} is empty"


def test_expected_files_exist():
    for name in ("README.md", "submit.sh", "runtime_env.yaml", "runtime_env.pip.yaml"):
        assert (JOBS / name).is_file(), name
    for name in ("README.md", "raycluster.yaml", "rayjob.yaml", "aws-gpu.yaml", "Dockerfile"):
        assert (CLUSTER / name).is_file(), name


# --- jobs/ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in JOBS.glob("runtime_env*.yaml")))
def test_runtime_env_is_valid_for_ray(name: str):
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((JOBS / name).read_text())
    RuntimeEnv(**data)  # Ray's own validation (field names, types, allowed combinations)
    env = data["env_vars"]
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env), "token must not be in jobs"
    assert env["RAY_TRAIN_V2_ENABLED"] == "1"  # Train v2 pinned for the job's processes
    if "working_dir" in data:
        excludes = set(data["excludes"])
        for pattern in (".git", ".venv", "/data", "/runs", "ray_results", "/checkpoints*"):
            assert pattern in excludes, pattern


def test_working_dir_upload_is_small_and_keeps_the_package(tmp_path: Path):
    from ray._private.runtime_env.packaging import _zip_files

    data = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    out = tmp_path / "wd.zip"
    _zip_files(str(ROOT), data["excludes"], str(out), include_gitignore=True)
    import zipfile

    names = zipfile.ZipFile(out).namelist()
    assert "controlnet_ray/data/pipeline.py" in names  # "/data" must not hit the package
    assert "controlnet_ray/train.py" in names
    assert "constraints.txt" in names  # runtime_env.pip.yaml's -c file travels with the code
    assert not [n for n in names if n.startswith((".venv/", ".git/"))]
    assert out.stat().st_size < 20 * 2**20


def test_pip_runtime_env_pins_match_pyproject():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    packages = yaml.safe_load((JOBS / "runtime_env.pip.yaml").read_text())["pip"]["packages"]
    assert not [p for p in packages if p.startswith("ray")], "the cluster's Ray must be used"
    for dep in deps:
        if dep.startswith("ray"):
            continue
        assert dep in packages, f"{dep} (pyproject) missing from runtime_env.pip.yaml"


def test_submit_script_is_valid_bash_and_refuses_without_token(tmp_path: Path):
    import subprocess

    script = JOBS / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run(
        ["bash", str(script), "train"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and "no token" in proc.stderr
    proc = subprocess.run(["bash", str(script), "bogus"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2


def test_jobs_readme_documents_commands_and_address_precedence():
    text = (JOBS / "README.md").read_text()
    for needed in (
        "ray job submit",
        "ray job logs",
        "-f",
        "ray job stop",
        "ray job status",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_API_SERVER_ADDRESS",
        "RAY_ADDRESS",
        "runtime_env.pip.yaml",
        "runtime_env.image.yaml",
    ):
        assert needed in text, needed


# --- cluster/: KubeRay -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifests_have_crd_required_fields(kind: str):
    objects = kube_objects(kind)
    assert objects, f"no {kind} manifest in cluster/"
    for path, obj in objects:
        where = f"{path.name}:{kind}"
        errors = missing(obj, OBJECT_FIELDS, where)
        assert obj["apiVersion"] == "ray.io/v1"
        if not (obj.get("metadata") or {}).get("name"):
            errors.append(f"{where}.metadata.name")
        if kind == "RayCluster":
            errors += check_cluster_spec(obj.get("spec") or {}, f"{where}.spec")
        else:
            errors += check_rayjob(obj, where)
        assert not errors, errors


@pytest.mark.parametrize("name,spec", [pytest.param(n, s, id=n) for n, s in cluster_specs()])
def test_cluster_spec_versions_gpus_storage_and_auth(name: str, spec: dict):
    assert spec["rayVersion"] == RAY_VERSION, name
    containers = all_containers(spec)
    images = {c["image"] for c in containers}
    assert len(images) == 1, f"{name}: head and workers must share one image, got {images}"
    assert f"ray{RAY_VERSION}" in images.pop()
    for group in spec["workerGroupSpecs"]:
        for c in pod_spec(group)["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress")
    mounts = {frozenset((m["name"], m["mountPath"]) for m in c["volumeMounts"]) for c in containers}
    assert len(mounts) == 1 and ("shared", "/mnt/shared") in next(iter(mounts))
    for c in containers:
        env = env_of(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": AUTH_SECRET, "key": "auth_token"}, c["name"]


def driver_resources(start_params: dict) -> dict:
    """The custom resources of a KubeRay group (rayStartParams.resources: a quoted JSON)."""
    raw = start_params.get("resources")
    return json.loads(json.loads(raw)) if raw else {}


@pytest.mark.parametrize("name,spec", [pytest.param(n, s, id=n) for n, s in cluster_specs()])
def test_only_the_head_offers_the_driver_resource(name: str, spec: dict):
    from controlnet_ray.tune import DRIVER_RESOURCE

    assert driver_resources(spec["headGroupSpec"]["rayStartParams"]) == {DRIVER_RESOURCE: 1}
    for group in spec["workerGroupSpecs"]:
        assert DRIVER_RESOURCE not in driver_resources(group["rayStartParams"]), name


def test_rayjob_uses_shared_storage_and_the_submitter_has_the_token():
    [(_, job)] = kube_objects("RayJob")
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "controlnet_ray.train"] or argv[2] == "controlnet_ray.tune"
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    for flag in ("--storage_path", "--cache_dir", "--save_dir", "--log_dir"):
        assert argv.count(flag) == 1 and argv[argv.index(flag) + 1].startswith("/mnt/shared/")
    assert "--use_gpu" in argv
    workers = sum(g["minReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert int(flags.get("--num_ray_workers", "1")) <= workers
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    [submitter] = spec["submitterPodTemplate"]["spec"]["containers"]
    assert env_of(submitter)["RAY_AUTH_MODE"]["value"] == "token"
    assert "RAY_AUTH_TOKEN" in env_of(submitter)


def test_no_small_machine_setting_is_baked_into_jobs_or_clusters():
    """RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1 suits a 2-core laptop (the launcher sets it for a
    local Ray only); on a cluster it would serialise Ray Data's footer reads."""
    files = [*JOBS.glob("*.yaml"), *CLUSTER.glob("*.yaml"), CLUSTER / "Dockerfile"]
    for path in files:
        assert "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in path.read_text(), path.name


def test_dockerfile_installs_dependencies_before_the_code_with_the_constraints():
    lines = [ln.strip() for ln in (CLUSTER / "Dockerfile").read_text().splitlines()]
    code = next(i for i, ln in enumerate(lines) if ln.startswith("COPY") and "_ray ./" in ln)
    torch = next(i for i, ln in enumerate(lines) if "torch==" in ln and "pip install" in ln)
    deps = next(i for i, ln in enumerate(lines) if '".[gpu]"' in ln)
    assert torch < deps < code, "torch, then the dependencies, then the code"
    # README.md (the package's long description) changes often: never before the installs
    assert not [ln for ln in lines[:deps] if ln.startswith("COPY") and "README.md" in ln]
    installs = [ln for ln in lines if "pip install" in ln and "--no-deps ." not in ln]
    assert installs and all("-c constraints.txt" in ln for ln in installs), installs


def test_dockerfile_pins_the_versions_of_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py311-gpu$", text, re.M)
    assert f"torch=={TORCH_VERSION}" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[train,tune,default]=={RAY_VERSION}"' in pyproject
    assert f'"torch=={TORCH_VERSION}"' in pyproject
    assert re.search(r"^ENV RAY_TRAIN_V2_ENABLED=1$", text, re.M)  # Train v2 in the image


# --- cluster/: Ray cluster launcher ----------------------------------------------------------


def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_launcher_yaml_matches_rays_schema():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, ray_schema())
    broken = {**config, "available_node_types": {"x": {"resources": {"GPU": 1}}}}
    with pytest.raises(jsonschema.ValidationError):  # the schema really is strict
        jsonschema.validate(broken, ray_schema())


def test_launcher_yaml_gpu_workers_autoscale_with_one_image_and_token():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(0 <= t["min_workers"] < t["max_workers"] for t in gpu)
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu)
    docker = config["docker"]
    assert f"ray{RAY_VERSION}" in docker["image"]
    assert not any("head_image" in d or "worker_image" in d for d in [docker, *types.values()])
    assert "-e RAY_AUTH_MODE=token" in docker["run_options"]
    assert any(t.endswith("/.ray/auth_token") for t in config["file_mounts"])
    assert any(":/mnt/shared" in o for o in docker["run_options"])
    from controlnet_ray.tune import DRIVER_RESOURCE

    head = types[config["head_node_type"]]["resources"]
    assert head.get(DRIVER_RESOURCE) == 1 and head.get("CPU") == 0
    assert not [t for t in gpu if DRIVER_RESOURCE in t["resources"]]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_cluster_readme_covers_access_storage_and_auth():
    text = (CLUSTER / "README.md").read_text()
    for needed in ("port-forward", "ClusterIP", "storage_path", "cache_dir", AUTH_SECRET, "ray up"):
        assert needed in text, needed
