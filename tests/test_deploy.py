"""Deployment files checked offline: Dockerfile, k8s/ manifests, launch/ scripts.

The manifests are rendered with kubectl's kustomize (launch/setup.sh installs kubectl into the venv),
validated against the Kubernetes API schemas of a pinned version (kubernetes-validate) and the vendored
CRDs of tests/schemas (jsonschema), and held to the code: every ``python -m dtrain`` command parses
with dtrain's own CLI, every ``horovodrun`` and ``dask`` command with those tools' own parsers, and
addresses, paths and names agree across objects. Custom objects are checked as their operators will
run them: a TrainJob through the pods Trainer v2 makes of it and its runtime, a DaskCluster through
the Deployments and Service the Dask operator makes of it.
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
from dataclasses import dataclass
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
# The custom kinds in k8s/ and the vendored CRD each is validated against.
CRDS = {
    ("kubeflow.org/v2beta1", "MPIJob"): "kubeflow.org_mpijobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
    ("kubernetes.dask.org/v1", "DaskCluster"): "kubernetes.dask.org_daskclusters.yaml",
    ("kubernetes.dask.org/v1", "DaskAutoscaler"): "kubernetes.dask.org_daskautoscalers.yaml",
}
# Kubernetes version whose API schemas the built-in objects must satisfy: the oldest of the three minor
# releases upstream supports (1.35-1.37 as kubernetes-validate ships them at the end of 2026).
K8S_VERSION = "1.35"
TRAINJOB_OVERLAYS = ["overlays/trainjob", "overlays/trainjob-dask-operator"]
DASK_OPERATOR_OVERLAYS = ["overlays/dask-operator", "overlays/trainjob-dask-operator"]
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu", "overlays/elastic", "overlays/dask-operator",
            *TRAINJOB_OVERLAYS]
IMAGE_ROOT = "/opt/dtrain"  # where the Dockerfile puts the repository
SCRIPTS = ["local.sh", "multihost.sh", "dask_cluster.sh", "discover_hosts.py", "discover_k8s_pods.py"]
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Kubeflow Trainer v2 (pkg/constants): the label of the replicated job whose "node" container takes the
# TrainJob's trainer fields, and the hostfile its MPI plugin mounts into the launcher.
TRAINER_ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
MPI_HOSTFILE = "/etc/mpi/hostfile"  # the same path for the mpi-operator and Trainer v2


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


def runtime_of(objects: list[dict[str, Any]], trainjob: dict[str, Any]) -> dict[str, Any]:
    ref = trainjob["spec"]["runtimeRef"]
    assert ref.get("apiGroup", "trainer.kubeflow.org") == "trainer.kubeflow.org", ref
    return one(objects, ref.get("kind", "ClusterTrainingRuntime"), ref["name"])


def trainjob_pod_specs(trainjob: dict[str, Any], runtime: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod spec of each replicated job that Trainer v2 makes of a TrainJob and its runtime.

    As its JobSet builder does: the TrainJob's trainer image, command, args and env go into the
    container named "node" of the replicated job labelled as the trainer step; the rest is the runtime's.
    """
    trainer = trainjob["spec"].get("trainer", {})
    out = {}
    for rjob in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        spec = copy.deepcopy(rjob["template"]["spec"]["template"]["spec"])
        if (rjob["template"].get("metadata") or {}).get("labels", {}).get(TRAINER_ANCESTOR_LABEL) == "trainer":
            for container in spec["containers"]:
                if container["name"] == "node":
                    container.update({k: trainer[k] for k in ("image", "command", "args") if k in trainer})
                    env = {e["name"]: e for e in [*container.get("env", []), *trainer.get("env", [])]}
                    if env:
                        container["env"] = list(env.values())
        out[rjob["name"]] = spec
    return out


def pod_specs(obj: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod specs of a workload by role (Deployment, MPIJob, TrainingRuntime, TrainJob, DaskCluster)."""
    if obj["kind"] == "Deployment":
        return {obj["metadata"]["name"]: obj["spec"]["template"]["spec"]}
    if obj["kind"] == "MPIJob":
        return {role: spec["template"]["spec"] for role, spec in obj["spec"]["mpiReplicaSpecs"].items()}
    if obj["kind"] == "TrainingRuntime":
        rjobs = obj["spec"]["template"]["spec"]["replicatedJobs"]
        return {r["name"]: r["template"]["spec"]["template"]["spec"] for r in rjobs}
    if obj["kind"] == "TrainJob":
        return trainjob_pod_specs(obj, runtime_of(objects, obj))
    if obj["kind"] == "DaskCluster":
        return {"scheduler": obj["spec"]["scheduler"]["spec"], "worker": obj["spec"]["worker"]["spec"]}
    return {}


@dataclass
class TrainingJob:
    """The training job of an overlay, MPIJob or TrainJob, as the operator will run it."""

    obj: dict[str, Any]
    launcher: dict[str, Any]  # pod spec of the pod that runs horovodrun
    worker: dict[str, Any]  # pod spec of the pods that run the ranks
    hosts: list[str]  # the rank pods' names in the hostfile the operator writes
    slots: int  # ranks per rank pod

    def hostfile(self) -> str:
        """The operator's hostfile: both write "<host> slots=<n>" lines for OpenMPI."""
        return "".join(f"{host} slots={self.slots}\n" for host in self.hosts)


def training_job(objects: list[dict[str, Any]]) -> TrainingJob:
    jobs = [o for o in objects if o["kind"] in ("MPIJob", "TrainJob")]
    assert len(jobs) == 1, f"expected one MPIJob or TrainJob, found {[o['kind'] for o in jobs]}"
    (job,) = jobs
    name = job["metadata"]["name"]
    if job["kind"] == "MPIJob":
        specs = pod_specs(job, objects)
        workers = job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
        # mpi-operator v0.8 names the workers <job>-worker-<i> under the job's Service.
        hosts = [f"{name}-worker-{i}.{name}.default.svc" for i in range(workers)]
        return TrainingJob(job, specs["Launcher"], specs["Worker"], hosts, job["spec"].get("slotsPerWorker", 1))
    runtime = runtime_of(objects, job)
    specs = trainjob_pod_specs(job, runtime)
    policy, trainer = runtime["spec"]["mlPolicy"], job["spec"].get("trainer", {})
    nodes = trainer.get("numNodes", policy.get("numNodes", 1))
    slots = trainer.get("numProcPerNode", policy["mpi"].get("numProcPerNode", 1))
    # Trainer v2's JobSet plugin: <trainjob>-<replicated job>-<job index>-<pod index>.<subdomain>.
    hosts = [f"{name}-node-0-{i}.{name}" for i in range(nodes)]
    return TrainingJob(job, specs["launcher"], specs["node"], hosts, slots)


@dataclass
class DaskParts:
    """The Dask cluster of an overlay, plain Deployments or a DaskCluster, as it will run."""

    service_name: str
    service: dict[str, Any]  # Service spec
    scheduler_labels: dict[str, str]  # labels of the scheduler pod
    scheduler: dict[str, Any]  # pod spec
    worker: dict[str, Any]  # pod spec
    replicas: int


def dask_parts(objects: list[dict[str, Any]]) -> DaskParts:
    clusters = [o for o in objects if o["kind"] == "DaskCluster"]
    if not clusters:
        scheduler = one(objects, "Deployment", "dtrain-dask-scheduler")
        worker = one(objects, "Deployment", "dtrain-dask-worker")
        return DaskParts("dtrain-dask-scheduler", one(objects, "Service", "dtrain-dask-scheduler")["spec"],
                         scheduler["spec"]["template"]["metadata"]["labels"], scheduler["spec"]["template"]["spec"],
                         worker["spec"]["template"]["spec"], worker["spec"]["replicas"])
    (cluster,) = clusters
    assert not [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("dtrain-dask")]
    name, spec = cluster["metadata"]["name"], cluster["spec"]
    # The Dask operator's controller: the Service "<cluster>-scheduler" with spec.scheduler.service, and
    # a scheduler pod labelled with the cluster's labels plus these two.
    labels = {**cluster["metadata"].get("labels", {}), "dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    return DaskParts(f"{name}-scheduler", spec["scheduler"]["service"], labels, spec["scheduler"]["spec"],
                     spec["worker"]["spec"], spec["worker"]["replicas"])


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
        for role, spec in pod_specs(obj, objects).items():
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
    # The API server checks the root's apiVersion, kind and metadata itself, whether the CRD lists
    # them or not (the Dask operator's CRDs do not list metadata).
    schema["properties"].setdefault("metadata", {"type": "object"})
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


Validators = dict[tuple[str, str], jsonschema.protocols.Validator]


@pytest.fixture(scope="module")
def crd_validators() -> Validators:
    """A JSON Schema validator per custom kind, from the vendored CRDs."""
    out = {}
    for (api_version, kind), filename in CRDS.items():
        # The CRDs are 0.3-1 MB each: the C loader where PyYAML has it.
        crd = yaml.load((SCHEMAS / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (api_version.split("/")[0], kind)
        schema = crd_json_schema(crd, api_version.split("/")[1])
        jsonschema.Draft7Validator.check_schema(schema)
        out[api_version, kind] = jsonschema.Draft7Validator(schema)
    return out


def crd_errors(validator: jsonschema.protocols.Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# ---- rendering and schema validation ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_expected_objects(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    job = {("TrainJob", "dtrain"), ("TrainingRuntime", "dtrain-horovod")} if overlay in TRAINJOB_OVERLAYS \
        else {("MPIJob", "dtrain")}
    dask = {("DaskCluster", "dtrain-dask"), ("DaskAutoscaler", "dtrain-dask")} if overlay in DASK_OPERATOR_OVERLAYS \
        else {("Deployment", "dtrain-dask-scheduler"), ("Service", "dtrain-dask-scheduler"),
              ("Deployment", "dtrain-dask-worker")}
    extra = {(o["kind"], o["metadata"]["name"]) for o in objects if o["apiVersion"].startswith("rbac.")}
    extra |= {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] == "ServiceAccount"}
    assert kinds == {("PersistentVolumeClaim", "dtrain-runs"), ("ConfigMap", "dtrain-config")} | job | dask | extra
    for o in objects:
        assert DNS_1123.match(o["metadata"]["name"]), o["metadata"]["name"]
        assert "namespace" not in o["metadata"], "leave the namespace to kubectl -n / a kustomization"


def test_kubectl_kustomize_is_current() -> None:
    """Components and patches with targets need kustomize v5 (kubectl 1.27 and later)."""
    result = run([find_kubectl(), "version", "--client", "-o", "json"])
    assert result.returncode == 0, result.stderr
    versions = json.loads(result.stdout)
    version = versions["kustomizeVersion"]
    assert int(version.lstrip("v").split(".")[0]) >= 5, f"kustomize {version} is too old; run launch/setup.sh"
    if Path(find_kubectl()).parent == Path(sys.executable).parent:  # the one launch/setup.sh pins
        pinned = re.search(r"^KUBECTL_VERSION=(\S+)$", (LAUNCH / "setup.sh").read_text(), re.M)
        assert pinned and versions["clientVersion"]["gitVersion"] == f"v{pinned.group(1)}"


def test_kustomize_refuses_broken_kustomizations(tmp_path: Path) -> None:
    """A kustomization that does not build fails the rendering, it is not skipped."""
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(AssertionError, match=r"missing\.yaml"):
        kustomize(tmp_path)


def test_kubernetes_version_is_shipped_by_kubernetes_validate() -> None:
    shipped = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert K8S_VERSION in shipped, f"kubernetes-validate ships {sorted(shipped)}; re-pin K8S_VERSION"


def dask_operator_made(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """The built-in objects the Dask operator makes of a DaskCluster (its controller's build_* functions)."""
    name, spec = cluster["metadata"]["name"], cluster["spec"]
    labels = {"dask.org/cluster-name": name}
    scheduler_labels = {**labels, "dask.org/component": "scheduler"}
    worker_labels = {**labels, "dask.org/workergroup-name": f"{name}-default", "dask.org/component": "worker"}
    worker_spec = copy.deepcopy(spec["worker"]["spec"])
    for container in worker_spec["containers"]:
        names = {e["name"] for e in container.get("env", [])}
        container["env"] = container.get("env", []) + [
            e for e in ({"name": "DASK_WORKER_NAME", "value": f"{name}-default-worker-0123456789"},
                        {"name": "DASK_SCHEDULER_ADDRESS",
                         "value": f"tcp://{name}-scheduler.default.svc.cluster.local:8786"}) if e["name"] not in names]

    def deployment(obj_name: str, pod_labels: dict[str, str], pod_spec: dict[str, Any]) -> dict[str, Any]:
        meta = {"name": obj_name, "labels": pod_labels}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                "spec": {"replicas": 1, "selector": {"matchLabels": pod_labels},
                         "template": {"metadata": meta, "spec": pod_spec}}}

    return [
        deployment(f"{name}-scheduler", scheduler_labels, spec["scheduler"]["spec"]),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{name}-scheduler", "labels": scheduler_labels},
         "spec": spec["scheduler"]["service"]},
        deployment(f"{name}-default-worker-0123456789", worker_labels, worker_spec),
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_match_kubernetes_api(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Every built-in object, and those the Dask operator makes of a DaskCluster, in strict mode."""
    objects = rendered[overlay]
    builtin = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRDS]
    builtin += [made for o in objects if o["kind"] == "DaskCluster" for made in dask_operator_made(o)]
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(map(str, e.absolute_path))
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {path}: {e.message}")
    assert len(builtin) >= 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_objects_match_crds(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, crd_validators: Validators
) -> None:
    custom = [o for o in rendered[overlay] if (o["apiVersion"], o["kind"]) in CRDS]  # the rest: test above
    assert custom
    for obj in custom:
        assert crd_errors(crd_validators[obj["apiVersion"], obj["kind"]], obj) == [], (obj["kind"], overlay)
    for mpijob in (o for o in custom if o["kind"] == "MPIJob"):
        assert set(mpijob["spec"]["mpiReplicaSpecs"]) == {"Launcher", "Worker"}
        assert mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["replicas"] == 1


def test_validators_catch_mistakes(rendered: dict[str, list[dict[str, Any]]], crd_validators: Validators) -> None:
    """The validation above has teeth: typos and bad values fail, int-or-string takes both."""
    objects = rendered["base"]
    deployment = copy.deepcopy(one(objects, "Deployment", "dtrain-dask-worker"))
    deployment["spec"]["template"]["spec"]["containers"][0]["comand"] = ["dask"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)

    mpijob_validator = crd_validators["kubeflow.org/v2beta1", "MPIJob"]
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

    operators = rendered["overlays/trainjob-dask-operator"]
    runtime_validator = crd_validators["trainer.kubeflow.org/v1alpha1", "TrainingRuntime"]
    runtime = one(operators, "TrainingRuntime")
    bad = copy.deepcopy(runtime)
    bad["spec"]["mlPolicy"]["mpi"]["mpiImplementation"] = "MPICH2"
    assert crd_errors(runtime_validator, bad)
    bad = copy.deepcopy(runtime)
    bad["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "comand"] = ["sshd"]
    assert crd_errors(runtime_validator, bad)
    trainjob = one(operators, "TrainJob")
    bad = copy.deepcopy(trainjob)
    bad["spec"]["trainer"]["numNodes"] = "2"
    assert crd_errors(crd_validators["trainer.kubeflow.org/v1alpha1", "TrainJob"], bad)
    cluster_validator = crd_validators["kubernetes.dask.org/v1", "DaskCluster"]
    bad = copy.deepcopy(one(operators, "DaskCluster"))
    bad["spec"]["worker"]["spec"]["containers"][0]["comand"] = ["dask"]
    assert crd_errors(cluster_validator, bad)
    bad = copy.deepcopy(one(operators, "DaskAutoscaler"))
    del bad["spec"]["maximum"]
    assert crd_errors(crd_validators["kubernetes.dask.org/v1", "DaskAutoscaler"], bad)


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
    expected = ("TrainJob", "launcher") if overlay in TRAINJOB_OVERLAYS else ("MPIJob", "Launcher")
    assert [(obj["kind"], role) for obj, role, _, _ in commands] == [expected]
    for _, _, _, argv in commands:
        config = parse_dtrain(argv, objects, tmp_path)
        assert config.cluster.scheduler and config.run.run_dir


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_file_is_the_configmap_in_every_rank_pod(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    job = training_job(objects)
    ((_, _, _, argv),) = dtrain_commands(objects)
    path = flag(argv, "--config")
    for role, spec in (("launcher", job.launcher), ("worker", job.worker)):  # ranks run in the worker pods
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
    dask = dask_parts(objects)
    ((_, _, _, argv),) = dtrain_commands(objects)
    address = parse_dtrain(argv, objects, tmp_path).cluster.scheduler
    assert address is not None
    m = re.fullmatch(r"tcp://([a-z0-9-]+):(\d+)", address)
    assert m, address
    host, port = m.group(1), int(m.group(2))
    assert host == dask.service_name == "dtrain-dask-scheduler"
    (service_port,) = [p for p in dask.service["ports"] if p["port"] == port]
    assert dask.service["selector"].items() <= dask.scheduler_labels.items()

    (container,) = dask.scheduler["containers"]
    cmd = argv_of(container)
    assert cmd[:2] == ["dask", "scheduler"]
    params = dask_scheduler.main.make_context("dask scheduler", cmd[2:]).params
    target = service_port["targetPort"]
    container_port = next(p["containerPort"] for p in container["ports"] if target in (p["name"], p["containerPort"]))
    assert int(params["port"]) == container_port
    dashboard = next(p for p in dask.service["ports"] if p["port"] == 8787)
    assert params["dashboard_address"].rsplit(":", 1)[1] == "8787"
    assert any(dashboard["targetPort"] in (p["name"], p["containerPort"]) for p in container["ports"])

    (container,) = dask.worker["containers"]
    cmd = argv_of(container)
    assert cmd[:2] == ["dask", "worker"]
    params = dask_worker.main.make_context("dask worker", cmd[2:]).params
    assert params["scheduler"] == address
    assert params["preload_argv"] == (), f"dask worker does not know {params['preload_argv']}"
    env = {e["name"] for e in container.get("env", [])}
    if overlay in DASK_OPERATOR_OVERLAYS:
        env.add("DASK_WORKER_NAME")  # the operator sets it in every worker container
    for name in re.findall(r"\$\((\w+)\)", " ".join(cmd)):
        assert name in env, f"dask worker's command uses $({name}), which no one sets"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_run_dir_is_on_the_runs_volume(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    objects = rendered[overlay]
    one(objects, "PersistentVolumeClaim", "dtrain-runs")
    job = training_job(objects)
    ((_, _, _, argv),) = dtrain_commands(objects)
    run_dir = parse_dtrain(argv, objects, tmp_path).run.run_dir
    assert run_dir is not None and run_dir.startswith("/runs/")
    for role, spec in (("launcher", job.launcher), ("worker", job.worker)):
        volume = mount_of(spec, spec["containers"][0], run_dir)
        assert volume.get("persistentVolumeClaim", {}).get("claimName") == "dtrain-runs", (role, volume)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_horovodrun_command(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from horovod.runner.common.util.hosts import parse_host_files, parse_hosts

    objects = rendered[overlay]
    job = training_job(objects)
    ((_, _, prefix, _),) = dtrain_commands(objects)
    args = parse_horovodrun(prefix, monkeypatch)
    assert args.use_gloo
    ranks = len(job.hosts) * job.slots
    if overlay.endswith("elastic"):
        assert args.hostfile is None and args.hosts is None
        assert args.min_num_proc <= args.num_proc <= args.max_num_proc
        assert args.min_num_proc <= ranks <= args.max_num_proc
        script = image_path_to_repo(args.host_discovery_script)
        assert script == LAUNCH / "discover_k8s_pods.py"
    else:
        assert args.hostfile == MPI_HOSTFILE  # written by the mpi-operator or Trainer v2
        # horovodrun's own reading of the hostfile the operator writes: -np ranks, one per slot.
        hostfile = tmp_path / "hostfile"
        hostfile.write_text(job.hostfile())
        hosts = parse_hosts(parse_host_files(str(hostfile)))
        assert [h.hostname for h in hosts] == job.hosts
        assert int(args.num_proc) == sum(h.slots for h in hosts) == ranks, "-np must equal rank pods x slots"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scripts_named_in_manifests_exist(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    for obj in objects:
        for spec in pod_specs(obj, objects).values():
            for container in spec["containers"]:
                for token in argv_of(container):
                    if token.startswith(IMAGE_ROOT + "/"):
                        path = image_path_to_repo(token)
                        assert path.is_file(), f"{token} is not in the repository"
                        assert path.parent != LAUNCH or os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_for_every_container(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Dask clients, schedulers and workers must run the same versions: one image everywhere."""
    objects = rendered[overlay]
    images = {c["image"] for o in objects for s in pod_specs(o, objects).values() for c in s["containers"]}
    assert images == {"dtrain:cuda" if overlay.endswith("gpu") else "dtrain:cpu"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dask_workers_get_dtrains_malloc_settings(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    from dtrain.cluster import WORKER_MALLOC

    worker = dask_parts(rendered[overlay]).worker
    env = {e["name"]: e.get("value") for e in worker["containers"][0].get("env", [])}
    assert {k: env.get(k) for k in WORKER_MALLOC} == {k: str(v) for k, v in WORKER_MALLOC.items()}


def test_cpu_overlay_pins_cores(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["overlays/cpu"]
    mpijob = one(objects, "MPIJob")
    worker = pod_specs(mpijob, objects)["Worker"]["containers"][0]
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    launcher = pod_specs(mpijob, objects)["Launcher"]["containers"][0]
    threads = {e["name"]: e["value"] for e in launcher.get("env", [])}["OMP_NUM_THREADS"]
    assert int(threads) * mpijob["spec"]["slotsPerWorker"] <= int(worker["resources"]["limits"]["cpu"])


def test_gpu_overlay_one_rank_per_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["overlays/gpu"]
    mpijob = one(objects, "MPIJob")
    specs = pod_specs(mpijob, objects)
    gpus = int(specs["Worker"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and mpijob["spec"]["slotsPerWorker"] == gpus
    # Only the rank pods hold GPUs: not the launcher, not Dask.
    others = [c for o in objects for role, s in pod_specs(o, objects).items() if role != "Worker"
              for c in s["containers"]]
    assert len(others) == 3
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in others)
    assert any(t["key"] == "nvidia.com/gpu" for t in specs["Worker"].get("tolerations", []))


def test_elastic_overlay_discovery_and_rbac(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["overlays/elastic"]
    mpijob = one(objects, "MPIJob")
    launcher_spec = pod_specs(mpijob, objects)["Launcher"]
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


@pytest.mark.parametrize("overlay", TRAINJOB_OVERLAYS)
def test_trainjob_runtime_is_an_mpi_runtime_trainer_can_run(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """The TrainJob's runtime has the shape Trainer v2's MPI plugin builds on (pkg/runtime/.../mpi)."""
    objects = rendered[overlay]
    trainjob = one(objects, "TrainJob")
    runtime = runtime_of(objects, trainjob)
    assert runtime["kind"] == "TrainingRuntime", "namespaced, so the overlay needs no cluster-wide rights"
    mpi = runtime["spec"]["mlPolicy"]["mpi"]
    assert mpi["mpiImplementation"] == "OpenMPI"  # the only one whose hostfile Trainer writes
    assert mpi.get("runLauncherAsNode") is False, "the launcher runs horovodrun, not ranks"
    # The ssh keys go where the image's root sshd and ssh client look (see the Dockerfile).
    assert mpi["sshAuthMountPath"] == "/root/.ssh"
    assert "PermitRootLogin prohibit-password" in (REPO / "Dockerfile").read_text()

    spec = runtime["spec"]["template"]["spec"]
    rjobs = {r["name"]: r for r in spec["replicatedJobs"]}
    assert set(rjobs) == {"launcher", "node"}  # the names the MPI plugin mounts the hostfile and keys by
    launcher = rjobs["launcher"]
    assert launcher["template"]["metadata"]["labels"][TRAINER_ANCESTOR_LABEL] == "trainer"
    assert TRAINER_ANCESTOR_LABEL not in (rjobs["node"]["template"].get("metadata") or {}).get("labels", {})
    assert {"name": "node", "status": "Ready"} in launcher.get("dependsOn", []), "ssh only once sshd answers"
    assert [c["name"] for c in launcher["template"]["spec"]["template"]["spec"]["containers"]] == ["node"]
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["launcher"]}
    assert spec["network"]["publishNotReadyAddresses"] is True

    # The node pods run sshd and are Ready when it listens.
    (node,) = pod_specs(runtime, objects)["node"]["containers"]
    assert argv_of(node)[:2] == ["/usr/sbin/sshd", "-De"]
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports[node["readinessProbe"]["tcpSocket"]["port"]] == 22

    # Trainer refuses a TrainJob that sets the OpenMPI variables it sets itself.
    trainer = trainjob["spec"]["trainer"]
    assert not [e for e in trainer.get("env", []) if e["name"].startswith("OMPI_")]
    for role, pod in pod_specs(runtime, objects).items():
        assert pod.get("restartPolicy") in ("OnFailure", "Never"), f"{role}: a Job's pods cannot restart Always"
        # Trainer adds the volumes mpi-ssh-auth and mpi-hostfile, mounted at the ssh path and /etc/mpi.
        assert not {v["name"] for v in pod.get("volumes", [])} & {"mpi-ssh-auth", "mpi-hostfile"}, role
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert not [m for m in mounts if m.startswith(("/etc/mpi", mpi["sshAuthMountPath"]))], role


def autoscaler_bound_errors(objects: list[dict[str, Any]]) -> list[str]:
    """Why the DaskAutoscaler's bounds do not fit the DaskCluster and the run's config; [] when they do."""
    cluster, autoscaler = one(objects, "DaskCluster"), one(objects, "DaskAutoscaler")
    lo, hi = autoscaler["spec"]["minimum"], autoscaler["spec"]["maximum"]
    replicas = cluster["spec"]["worker"]["replicas"]
    errors = []
    if autoscaler["spec"]["cluster"] != cluster["metadata"]["name"]:
        errors.append(f"autoscales {autoscaler['spec']['cluster']!r}, not {cluster['metadata']['name']!r}")
    if not 1 <= lo <= replicas <= hi:
        errors.append(f"needs 1 <= minimum {lo} <= workers {replicas} <= maximum {hi}")
    data = Config.from_dict(configmap_config(objects)).data
    if data.data is None and hi > data.gen_partitions:
        errors.append(f"maximum {hi} > the {data.gen_partitions} partitions of the generated data")
    return errors


@pytest.mark.parametrize("overlay", DASK_OPERATOR_OVERLAYS)
def test_dask_autoscaler_is_bounded_by_the_config(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    assert autoscaler_bound_errors(objects) == []
    config = copy.deepcopy(one(objects, "ConfigMap", "dtrain-config"))
    raw = yaml.safe_load(config["data"]["config.yaml"])
    raw["data"]["gen_partitions"] = one(objects, "DaskAutoscaler")["spec"]["maximum"] - 1
    config["data"]["config.yaml"] = yaml.safe_dump(raw)
    swapped = [config if o["kind"] == "ConfigMap" else o for o in objects]
    assert any("partitions" in e for e in autoscaler_bound_errors(swapped))


@pytest.mark.parametrize("overlay", DASK_OPERATOR_OVERLAYS)
def test_daskcluster_speaks_the_operators_names(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """The operator finds the scheduler's ports by name, and asks its HTTP API how many workers to keep."""
    import dask.config
    import distributed
    from distributed.http.scheduler import api

    parts = dask_parts(rendered[overlay])
    assert {p["name"] for p in parts.service["ports"]} >= {"tcp-comm", "http-dashboard"}
    (container,) = parts.scheduler["containers"]
    assert {p["name"] for p in container["ports"]} >= {"tcp-comm", "http-dashboard"}
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("DASK_")}
    routes = dask.config.collect_env(env)["distributed"]["scheduler"]["http"]["routes"]
    # Dask's shipped defaults, not the live config: a Scheduler started in this process without bokeh
    # appends its fallback routes to that very list (distributed/scheduler.py).
    shipped = Path(distributed.__file__).with_name("distributed.yaml")
    defaults = yaml.safe_load(shipped.read_text())["distributed"]["scheduler"]["http"]["routes"]
    assert routes == [*defaults, api.__name__], "Dask's default routes and the scheduler API"
    for route in routes:
        assert importlib.util.find_spec(route), f"{route} is not a module of this Dask"


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
