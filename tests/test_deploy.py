"""Deployment files checked offline: Dockerfile, k8s/ manifests, launch/ scripts.

The manifests are rendered with kubectl's kustomize (launch/setup.sh installs kubectl into the venv),
validated against the Kubernetes API schemas of a pinned version (kubernetes-validate) and the vendored
CRDs of tests/schemas (jsonschema), and held to the
code: every ``python -m dtrain`` command parses with dtrain's own CLI, every ``horovodrun`` and ``dask``
command with those tools' own parsers, and addresses, paths and names agree across objects.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dtrain.cli import build_parser, parse_config
from dtrain.config import Config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
LAUNCH = REPO / "launch"
SCHEMAS = REPO / "tests" / "schemas"  # vendored CRDs: see tests/schemas/README.md
CRD_PATH = SCHEMAS / "kubeflow.org_mpijobs.yaml"
# Kubernetes version whose API schemas the built-in objects must satisfy.
K8S_VERSION = "1.30"
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu", "overlays/elastic"]
IMAGE_ROOT = "/opt/dtrain"  # where the Dockerfile puts the repository
SCRIPTS = ["local.sh", "multihost.sh", "dask_cluster.sh", "discover_hosts.py", "discover_k8s_pods.py"]
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# ---- helpers -------------------------------------------------------------------------------------------


def find_kubectl() -> str:
    """The venv's kubectl (installed by launch/setup.sh), else one on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    found = str(venv_kubectl) if os.access(venv_kubectl, os.X_OK) else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl to render k8s/ with; run launch/setup.sh (it installs one into the venv)")
    return found


def kustomize(path: Path) -> list[dict[str, Any]]:
    result = run([find_kubectl(), "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(K8S / name) for name in OVERLAYS}


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_specs(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod specs of a workload by role: Deployment → its template; MPIJob → Launcher and Worker."""
    if obj["kind"] == "Deployment":
        return {obj["metadata"]["name"]: obj["spec"]["template"]["spec"]}
    if obj["kind"] == "MPIJob":
        return {role: spec["template"]["spec"] for role, spec in obj["spec"]["mpiReplicaSpecs"].items()}
    return {}


def argv_of(container: dict[str, Any]) -> list[str]:
    """command + args as one argv; a ``sh -c`` script is split like the shell would."""
    tokens = [*container.get("command", []), *container.get("args", [])]
    if len(tokens) >= 3 and tokens[1] == "-c" and tokens[0].endswith("sh"):
        return shlex.split(tokens[2])
    return tokens


def split_dtrain(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """``(launcher prefix, dtrain argv)`` when argv runs ``python -m dtrain``, else None."""
    for i in range(len(argv) - 2):
        if re.fullmatch(r"python(3(\.\d+)?)?", Path(argv[i]).name) and argv[i + 1 : i + 3] == ["-m", "dtrain"]:
            return argv[:i], argv[i + 3 :]
    return None


def dtrain_commands(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, list[str], list[str]]]:
    """Every ``(object, role, prefix, dtrain argv)`` in the rendered objects."""
    out = []
    for obj in objects:
        for role, spec in pod_specs(obj).items():
            for c in spec["containers"]:
                found = split_dtrain(argv_of(c))
                if found:
                    out.append((obj, role, *found))
    return out


def flag(argv: list[str], name: str) -> str:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    values += [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, f"expected {name} once in {argv}"
    return values[0]


def configmap_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(objects, "ConfigMap", "dtrain-config")["data"]["config.yaml"])


def parse_dtrain(argv: list[str], objects: list[dict[str, Any]], tmp_path: Path) -> Config:
    """dtrain's own CLI on a manifest's argv, with --config pointing at the ConfigMap's config."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(one(objects, "ConfigMap", "dtrain-config")["data"]["config.yaml"])
    argv = list(argv)
    i = argv.index("--config")
    argv[i + 1] = str(cfg)
    build_parser().parse_args(argv)  # every flag is one dtrain knows
    return parse_config(argv)


def mount_of(spec: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume that holds ``path`` in ``container`` (longest mountPath prefix)."""
    mounts = [
        m for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return one_volume(spec, mount["name"])


def one_volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    vols = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(vols) == 1, f"volume {name} defined {len(vols)} times"
    return vols[0]


def parse_horovodrun(prefix: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """horovodrun's own argument parser on the part of a command before ``python -m dtrain``."""
    from horovod.runner import launch

    assert Path(prefix[0]).name == "horovodrun", prefix
    monkeypatch.setattr(sys, "argv", [*prefix, "python", "-m", "dtrain"])
    return launch.parse_args()


def image_path_to_repo(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT + "/"), f"{path} is not inside the image's {IMAGE_ROOT}"
    return REPO / path[len(IMAGE_ROOT) + 1 :]


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), LAUNCH / name)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- CRD schema → JSON Schema ------------------------------------------------------------------------------


def crd_json_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema`` for ``version`` as a JSON Schema.

    Kubernetes extensions become plain JSON Schema: ``x-kubernetes-int-or-string`` → integer or string,
    ``nullable`` → null allowed; objects that list their properties reject unknown fields (the API server
    drops them, and ``kubectl apply`` with strict field validation refuses them) unless marked
    ``x-kubernetes-preserve-unknown-fields``. Other ``x-kubernetes-*`` keys (list types, map types) only
    guide server-side apply and are dropped.
    """
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out

    schema = convert(ver["schema"]["openAPIV3Schema"])
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


@pytest.fixture(scope="module")
def mpijob_validator() -> jsonschema.protocols.Validator:
    crd = yaml.load(CRD_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 650 kB
    schema = crd_json_schema(crd, "v2beta1")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(validator: jsonschema.protocols.Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# ---- rendering and schema validation ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_expected_objects(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("PersistentVolumeClaim", "dtrain-runs"),
        ("ConfigMap", "dtrain-config"),
        ("Deployment", "dtrain-dask-scheduler"),
        ("Service", "dtrain-dask-scheduler"),
        ("Deployment", "dtrain-dask-worker"),
        ("MPIJob", "dtrain"),
    } <= kinds
    for o in objects:
        assert DNS_1123.match(o["metadata"]["name"]), o["metadata"]["name"]
        assert "namespace" not in o["metadata"], "leave the namespace to kubectl -n / a kustomization"


def test_kubectl_kustomize_is_current() -> None:
    """Components and patches with targets need kustomize v5 (kubectl 1.27 and later)."""
    result = run([find_kubectl(), "version", "--client", "-o", "json"])
    assert result.returncode == 0, result.stderr
    version = json.loads(result.stdout)["kustomizeVersion"]
    assert int(version.lstrip("v").split(".")[0]) >= 5, f"kustomize {version} is too old; run launch/setup.sh"


def test_kustomize_refuses_broken_kustomizations(tmp_path: Path) -> None:
    """A kustomization that does not build fails the rendering, it is not skipped."""
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(AssertionError, match=r"missing\.yaml"):
        kustomize(tmp_path)


def test_kubernetes_version_is_shipped_by_kubernetes_validate() -> None:
    shipped = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert K8S_VERSION in shipped, f"kubernetes-validate ships {sorted(shipped)}; re-pin K8S_VERSION"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_match_kubernetes_api(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    checked = 0
    for obj in rendered[overlay]:
        if obj["apiVersion"].startswith("kubeflow.org/"):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(map(str, e.absolute_path))
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {path}: {e.message}")
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mpijob_matches_crd(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, mpijob_validator: jsonschema.protocols.Validator
) -> None:
    mpijob = one(rendered[overlay], "MPIJob")
    assert mpijob["apiVersion"] == "kubeflow.org/v2beta1"
    assert crd_errors(mpijob_validator, mpijob) == []
    assert set(mpijob["spec"]["mpiReplicaSpecs"]) == {"Launcher", "Worker"}
    assert mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["replicas"] == 1


def test_validators_catch_mistakes(
    rendered: dict[str, list[dict[str, Any]]], mpijob_validator: jsonschema.protocols.Validator
) -> None:
    """The validation above has teeth: typos and bad values fail, int-or-string takes both."""
    objects = rendered["base"]
    deployment = copy.deepcopy(one(objects, "Deployment", "dtrain-dask-worker"))
    deployment["spec"]["template"]["spec"]["containers"][0]["comand"] = ["dask"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)

    mpijob = one(objects, "MPIJob")
    typo = copy.deepcopy(mpijob)
    typo["spec"]["slotPerWorker"] = typo["spec"].pop("slotsPerWorker")
    assert crd_errors(mpijob_validator, typo)
    bad_enum = copy.deepcopy(mpijob)
    bad_enum["spec"]["mpiImplementation"] = "OpenMPI5"
    assert crd_errors(mpijob_validator, bad_enum)
    bad_type = copy.deepcopy(mpijob)
    bad_type["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] = "two"
    assert crd_errors(mpijob_validator, bad_type)
    container = lambda job: job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]  # noqa: E731
    for port in (22, "ssh"):  # probe ports and quantities are int-or-string
        ok = copy.deepcopy(mpijob)
        container(ok)["readinessProbe"]["tcpSocket"]["port"] = port
        container(ok)["resources"]["limits"] = {"cpu": 2 if port == 22 else "2"}
        assert crd_errors(mpijob_validator, ok) == []
    wrong = copy.deepcopy(mpijob)
    container(wrong)["readinessProbe"]["tcpSocket"]["port"] = 22.5
    assert crd_errors(mpijob_validator, wrong)


# ---- manifests agree with the code -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_config_loads(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    raw = configmap_config(rendered[overlay])
    config = Config.from_dict(raw)
    assert Config.from_dict(yaml.safe_load(config.to_yaml())) == config


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dtrain_commands_parse_with_dtrain_cli(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    objects = rendered[overlay]
    commands = dtrain_commands(objects)
    assert [(obj["kind"], role) for obj, role, _, _ in commands] == [("MPIJob", "Launcher")]
    for _, _, _, argv in commands:
        config = parse_dtrain(argv, objects, tmp_path)
        assert config.cluster.scheduler and config.run.run_dir


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_file_is_the_configmap_in_every_rank_pod(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    mpijob = one(objects, "MPIJob")
    ((_, _, _, argv),) = dtrain_commands(objects)
    path = flag(argv, "--config")
    for role, spec in pod_specs(mpijob).items():  # ranks run in Worker pods; the launcher names the path
        container = spec["containers"][0]
        volume = mount_of(spec, container, path)
        assert volume.get("configMap", {}).get("name") == "dtrain-config", (role, volume)
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert path == f"{mount['mountPath'].rstrip('/')}/config.yaml"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_address_is_the_scheduler_service(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    from distributed.cli import dask_scheduler, dask_worker

    objects = rendered[overlay]
    ((_, _, _, argv),) = dtrain_commands(objects)
    address = parse_dtrain(argv, objects, tmp_path).cluster.scheduler
    assert address is not None
    m = re.fullmatch(r"tcp://([a-z0-9-]+):(\d+)", address)
    assert m, address
    host, port = m.group(1), int(m.group(2))
    service = one(objects, "Service", host)
    assert host == "dtrain-dask-scheduler"
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]

    scheduler = one(objects, "Deployment", "dtrain-dask-scheduler")
    pod = scheduler["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    cmd = argv_of(container)
    assert cmd[:2] == ["dask", "scheduler"]
    params = dask_scheduler.main.make_context("dask scheduler", cmd[2:]).params
    target = service_port["targetPort"]
    container_port = next(p["containerPort"] for p in container["ports"] if target in (p["name"], p["containerPort"]))
    assert int(params["port"]) == container_port
    dashboard = next(p for p in service["spec"]["ports"] if p["port"] == 8787)
    assert params["dashboard_address"].rsplit(":", 1)[1] == "8787"
    assert any(dashboard["targetPort"] in (p["name"], p["containerPort"]) for p in container["ports"])

    worker = one(objects, "Deployment", "dtrain-dask-worker")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    cmd = argv_of(container)
    assert cmd[:2] == ["dask", "worker"]
    params = dask_worker.main.make_context("dask worker", cmd[2:]).params
    assert params["scheduler"] == address
    assert params["preload_argv"] == (), f"dask worker does not know {params['preload_argv']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_run_dir_is_on_the_runs_volume(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    objects = rendered[overlay]
    one(objects, "PersistentVolumeClaim", "dtrain-runs")
    mpijob = one(objects, "MPIJob")
    ((_, _, _, argv),) = dtrain_commands(objects)
    run_dir = parse_dtrain(argv, objects, tmp_path).run.run_dir
    assert run_dir is not None and run_dir.startswith("/runs/")
    for role, spec in pod_specs(mpijob).items():
        volume = mount_of(spec, spec["containers"][0], run_dir)
        assert volume.get("persistentVolumeClaim", {}).get("claimName") == "dtrain-runs", (role, volume)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_horovodrun_command(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[overlay]
    mpijob = one(objects, "MPIJob")
    ((_, _, prefix, _),) = dtrain_commands(objects)
    args = parse_horovodrun(prefix, monkeypatch)
    assert args.use_gloo
    workers = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
    slots = mpijob["spec"].get("slotsPerWorker", 1)
    if overlay.endswith("elastic"):
        assert args.hostfile is None and args.hosts is None
        assert args.min_num_proc <= args.num_proc <= args.max_num_proc
        assert args.min_num_proc <= workers * slots <= args.max_num_proc
        script = image_path_to_repo(args.host_discovery_script)
        assert script == LAUNCH / "discover_k8s_pods.py"
    else:
        assert args.hostfile == "/etc/mpi/hostfile"  # written by the mpi-operator
        assert int(args.num_proc) == workers * slots, "-np must equal Worker replicas x slotsPerWorker"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scripts_named_in_manifests_exist(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for obj in rendered[overlay]:
        for spec in pod_specs(obj).values():
            for container in spec["containers"]:
                for token in argv_of(container):
                    if token.startswith(IMAGE_ROOT + "/"):
                        path = image_path_to_repo(token)
                        assert path.is_file(), f"{token} is not in the repository"
                        assert path.parent != LAUNCH or os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_for_every_container(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Dask clients, schedulers and workers must run the same versions: one image everywhere."""
    images = {
        c["image"] for o in rendered[overlay] for s in pod_specs(o).values() for c in s["containers"]
    }
    assert images == {"dtrain:cuda" if overlay.endswith("gpu") else "dtrain:cpu"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dask_workers_get_dtrains_malloc_settings(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    from dtrain.cluster import WORKER_MALLOC

    worker = pod_specs(one(rendered[overlay], "Deployment", "dtrain-dask-worker"))["dtrain-dask-worker"]
    env = {e["name"]: e.get("value") for e in worker["containers"][0].get("env", [])}
    assert {k: env.get(k) for k in WORKER_MALLOC} == {k: str(v) for k, v in WORKER_MALLOC.items()}


def test_cpu_overlay_pins_cores(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["overlays/cpu"]
    mpijob = one(objects, "MPIJob")
    worker = pod_specs(mpijob)["Worker"]["containers"][0]
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    launcher = pod_specs(mpijob)["Launcher"]["containers"][0]
    threads = {e["name"]: e["value"] for e in launcher.get("env", [])}["OMP_NUM_THREADS"]
    assert int(threads) * mpijob["spec"]["slotsPerWorker"] <= int(worker["resources"]["limits"]["cpu"])


def test_gpu_overlay_one_rank_per_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    mpijob = one(rendered["overlays/gpu"], "MPIJob")
    specs = pod_specs(mpijob)
    gpus = int(specs["Worker"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and mpijob["spec"]["slotsPerWorker"] == gpus
    # Only the rank pods hold GPUs: not the launcher, not Dask.
    others = [c for o in rendered["overlays/gpu"] for role, s in pod_specs(o).items() if role != "Worker"
              for c in s["containers"]]
    assert len(others) == 3
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in others)
    assert any(t["key"] == "nvidia.com/gpu" for t in specs["Worker"].get("tolerations", []))


def test_elastic_overlay_discovery_and_rbac(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["overlays/elastic"]
    mpijob = one(objects, "MPIJob")
    launcher_spec = pod_specs(mpijob)["Launcher"]
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    assert launcher_spec["serviceAccountName"] == account
    assert launcher_spec.get("automountServiceAccountToken", True)
    role = one(objects, "Role")
    assert any(
        "" in r["apiGroups"] and "pods" in r["resources"] and "list" in r["verbs"] for r in role["rules"]
    )
    binding = one(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]
    ]

    # The selector picks exactly the worker pods the mpi-operator creates for this MPIJob.
    env = {e["name"]: e for e in launcher_spec["containers"][0]["env"]}
    selector = dict(kv.split("=", 1) for kv in env["DTRAIN_POD_SELECTOR"]["value"].split(","))
    name = mpijob["metadata"]["name"]
    operator_labels = {"training.kubeflow.org/operator-name": "mpi-operator",
                       "training.kubeflow.org/job-name": name}
    worker_labels = {**operator_labels, "training.kubeflow.org/job-role": "worker",
                     **mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"].get("labels", {})}
    launcher_labels = {**operator_labels, "training.kubeflow.org/job-role": "launcher",
                       **mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["metadata"].get("labels", {})}
    assert selector.items() <= worker_labels.items()
    assert not selector.items() <= launcher_labels.items()
    assert int(env["DTRAIN_SLOTS"]["value"]) == mpijob["spec"]["slotsPerWorker"]
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


# ---- Dockerfile --------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_runs_setup_sh_once() -> None:
    instructions = dockerfile_instructions()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in instructions if word == "ARG"}
    assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm"
    assert ("FROM", "${BASE_IMAGE}") in instructions
    assert args["DTRAIN_WITH_NCCL"] == "0"
    assert any(w == "ENV" and "DTRAIN_WITH_NCCL=${DTRAIN_WITH_NCCL}" in r.split() for w, r in instructions)
    runs = [r for w, r in instructions if w == "RUN"]
    setup = [r for r in runs if "launch/setup.sh" in r]
    assert len(setup) == 1, "the image is set up by launch/setup.sh, once"
    assert not any(re.search(r"\bpip3? install\b|-m pip\b", r) for r in runs), "no second install recipe"
    assert ("WORKDIR", IMAGE_ROOT) in instructions
    assert any(w == "COPY" and r.split()[-1].rstrip("/") in (IMAGE_ROOT, ".") for w, r in instructions)
    apt = next(r for r in runs if "apt-get install" in r).split()
    for package in ("g++", "make", "cmake", "openssh-server", "openssh-client"):
        assert package in apt
    env = " ".join(r for w, r in instructions if w == "ENV")
    assert re.search(rf"PATH={IMAGE_ROOT}/\.venv/bin:", env)


def test_dockerfile_configures_ssh_between_pods() -> None:
    text = (REPO / "Dockerfile").read_text()
    for setting in ("StrictHostKeyChecking no", "UserKnownHostsFile /dev/null", "Port 22",
                    "PermitRootLogin prohibit-password", "PasswordAuthentication no"):
        assert setting in text
    assert "mkdir -p /run/sshd" in text and "ssh-keygen -A" in text


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "runs"} <= entries
    assert any("__pycache__" in e for e in entries)


# ---- launch scripts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_help(script: str) -> None:
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env ")
    result = run([str(path), "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_local_sh_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DTRAIN_VENV", "HOROVODRUN_ARGS")}
    result = run([str(LAUNCH / "local.sh"), "-n", "3", "--dry-run", "--", "--epochs", "1", "--run-dir",
                  str(tmp_path / "a run")], env=env)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    prefix, dtrain_argv = split_dtrain(argv) or ([], [])
    assert prefix == [str(REPO / ".venv/bin/horovodrun"), "-np", "3", "-H", "localhost:3", "--gloo"]
    assert argv[len(prefix)] == str(REPO / ".venv/bin/python")
    config = parse_config(dtrain_argv)
    assert config.train.epochs == 1 and config.run.run_dir == str(tmp_path / "a run")
    args = parse_horovodrun(prefix, monkeypatch)
    assert args.num_proc == 3 and args.hosts == "localhost:3" and args.use_gloo

    bad = run([str(LAUNCH / "local.sh"), "-n", "0", "--dry-run"])
    assert bad.returncode == 2 and "positive integer" in bad.stderr


def test_multihost_sh_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# training hosts\nnode-a slots=2\n\nnode-b:4   # the big one\nnode-c\n")
    script = str(LAUNCH / "multihost.sh")
    result = run([script, "--hostfile", str(hosts), "--dry-run", "--", "--scheduler", "tcp://node-a:8786"])
    assert result.returncode == 0, result.stderr
    prefix, dtrain_argv = split_dtrain(shlex.split(result.stdout)) or ([], [])
    args = parse_horovodrun(prefix, monkeypatch)
    assert args.num_proc == 7 and args.hosts == "node-a:2,node-b:4,node-c:1" and args.use_gloo
    assert parse_config(dtrain_argv).cluster.scheduler == "tcp://node-a:8786"

    result = run([script, "-H", "x:2,y", "-p", "2222", "--dry-run"])
    args = parse_horovodrun(split_dtrain(shlex.split(result.stdout))[0], monkeypatch)  # type: ignore[index]
    assert args.hosts == "x:2,y:1" and args.num_proc == 3 and int(args.ssh_port) == 2222

    result = run([script, "--hostfile", str(hosts), "--min-np", "2", "--max-np", "8", "--dry-run"])
    assert result.returncode == 0, result.stderr
    env_assign, *argv = shlex.split(result.stdout)
    assert env_assign == f"DTRAIN_HOSTS_FILE={hosts}"
    args = parse_horovodrun(split_dtrain(argv)[0], monkeypatch)  # type: ignore[index]
    assert (args.num_proc, args.min_num_proc, args.max_num_proc) == (2, 2, 8)
    assert args.host_discovery_script == str(LAUNCH / "discover_hosts.py")

    assert run([script, "--dry-run"]).returncode == 2
    assert run([script, "-H", "x:2,x:1", "--dry-run"]).returncode == 2


def test_discover_hosts(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n\nnode1\nnode2:4\n  node3 slots=2  # trailing comment\n10.0.0.7:1\n")
    expected = "node1:1\nnode2:4\nnode3:2\n10.0.0.7:1\n"
    script = str(LAUNCH / "discover_hosts.py")
    result = run([sys.executable, script, str(hosts)])
    assert (result.returncode, result.stdout) == (0, expected), result.stderr
    env = {**os.environ, "DTRAIN_HOSTS_FILE": str(hosts), "DTRAIN_SLOTS": "2"}
    result = run([sys.executable, script], env=env)  # as horovodrun calls it: no arguments
    assert result.stdout == expected.replace("node1:1", "node1:2")
    hosts.write_text("")
    assert run([sys.executable, script, str(hosts)]).stdout == ""

    discover_hosts = load_script("discover_hosts.py")
    for bad in ("a b c", "a:x", "a:0", "a:2 slots=3", "a\na:2"):
        with pytest.raises(ValueError):
            discover_hosts.parse_hosts(bad)
    hosts.write_text("a b c\n")
    result = run([sys.executable, script, str(hosts)])
    assert result.returncode == 1 and "line 1" in result.stderr
    env.pop("DTRAIN_HOSTS_FILE")
    assert run([sys.executable, script], env=env).returncode == 2


def pod(name: str, ip: str | None, phase: str = "Running", ready: str = "True", **meta: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": ready}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": name, **meta}, "status": status}


POD_LIST = {
    "kind": "PodList",
    "apiVersion": "v1",
    "items": [
        pod("dtrain-worker-1", "10.1.0.11"),
        pod("dtrain-worker-0", "10.1.0.10"),
        pod("dtrain-worker-2", "10.1.0.12", ready="False"),  # starting: sshd not up yet
        pod("dtrain-worker-3", None, phase="Pending", ready="False"),
        pod("dtrain-worker-4", "10.1.0.14", deletionTimestamp="2026-01-01T00:00:00Z"),  # terminating
        pod("dtrain-worker-5", "10.1.0.15", phase="Succeeded", ready="False"),
        pod("dtrain-worker-6", "10.1.0.16", phase="Failed"),
        {"metadata": {"name": "dtrain-worker-7"}, "status": {"phase": "Running", "podIP": "10.1.0.17"}},
    ],
}


def test_discover_k8s_pods_parsing() -> None:
    k8s = load_script("discover_k8s_pods.py")
    assert k8s.ready_pod_hosts(POD_LIST) == ["10.1.0.10:1", "10.1.0.11:1"]
    assert k8s.ready_pod_hosts(POD_LIST, slots=4) == ["10.1.0.10:4", "10.1.0.11:4"]
    assert k8s.ready_pod_hosts(json.loads(json.dumps({"items": None}))) == []
    with pytest.raises(ValueError):
        k8s.ready_pod_hosts(POD_LIST, slots=0)
    url = k8s.pods_url("https://10.96.0.1:443/", "team-a", "training.kubeflow.org/job-name=dtrain,x=y")
    parts = urlsplit(url)
    assert parts.path == "/api/v1/namespaces/team-a/pods"
    assert parse_qs(parts.query) == {"labelSelector": ["training.kubeflow.org/job-name=dtrain,x=y"]}
    assert k8s.api_server_from_env({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}) \
        == "https://10.96.0.1:443"
    assert k8s.api_server_from_env({"KUBERNETES_SERVICE_HOST": "fd00::1"}) == "https://[fd00::1]:443"
    with pytest.raises(ValueError):
        k8s.api_server_from_env({})


@pytest.fixture
def fake_api() -> Iterator[tuple[str, list[dict[str, Any]], dict[str, int]]]:
    """A local HTTP server answering pod lists; records each request."""
    seen: list[dict[str, Any]] = []
    answer = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
            body = json.dumps(POD_LIST if answer["status"] == 200 else {"kind": "Status"}).encode()
            self.send_response(answer["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen, answer
    finally:
        server.shutdown()
        server.server_close()


def test_discover_k8s_pods_queries_the_api(
    fake_api: tuple[str, list[dict[str, Any]], dict[str, int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, seen, answer = fake_api
    k8s = load_script("discover_k8s_pods.py")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    env = {"DTRAIN_POD_SELECTOR": "training.kubeflow.org/job-role=worker", "POD_NAMESPACE": "ml",
           "DTRAIN_SLOTS": "2"}
    assert k8s.main(["--api-server", url, "--token-file", str(token)], env=env) == 0
    assert capsys.readouterr().out == "10.1.0.10:2\n10.1.0.11:2\n"
    (request,) = seen
    parts = urlsplit(request["path"])
    assert parts.path == "/api/v1/namespaces/ml/pods"
    assert parse_qs(parts.query) == {"labelSelector": ["training.kubeflow.org/job-role=worker"]}
    assert request["auth"] == "Bearer s3cret"

    answer["status"] = 403
    assert k8s.main(["--api-server", url, "--token-file", str(token)], env=env) == 1
    assert "cannot list pods" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        k8s.main(["--api-server", url], env={"POD_NAMESPACE": "ml"})  # no selector
    assert exit_info.value.code == 2
